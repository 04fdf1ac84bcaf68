"""The in-process engine: a DP-FedAvg round's TF graphs run in this process.

TFF's `worker_binary` costs tens of milliseconds per round and per client and
is CPU-only (BUILD.md). This engine runs the *same* computation without it:
the learning process built from our factories is compiled by TFF's own
MapReduce compiler (`tff.backends.mapreduce`, the form TFF uses to deploy a
computation) into TensorFlow computations, and their graphs are imported into
Python TensorFlow as concrete functions, with device annotations cleared so
that TensorFlow places them on a GPU when it sees one:

  prepare(state)                    -> the clients' broadcast input
  work(client data, input)          -> each client's update (training,
                                       clipping, client-side noise)
  zero / accumulate / report        -> the aggregate of the updates
  update(state, aggregate)          -> the next state and the metrics
                                       (server noise, server optimizer)

The mechanism's math is not re-implemented here: a change to a factory
changes what this engine runs. Secure sums are replaced before compiling by
TFF's test bodies (as the worker's simulating context does), which sum in the
clear and fail on an input outside the secure sum's bounds.

Client data is fed in process: the vectorized process's groups of users (see
`dp_fedavg.vectorized`) or the standard process's datasets, one `work` call
per TFF client.
"""

import collections
import concurrent.futures
import functools
import os
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
# The MapReduce compiler's entry points are exported, the pieces below are
# not: the binding of a TF computation's graph, its serialized graph, the
# remapping of its parameters, and TFF's insecure bodies of the secure
# intrinsics.
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.backends.test import compiler as test_compiler
from tensorflow_federated.python.core.impl.types import type_conversions
from tensorflow_federated.python.core.impl.utils import tensorflow_utils
from tensorflow_federated.python.tensorflow_libs import graph_utils
from tensorflow_federated.python.tensorflow_libs import serialization_utils


class UnsupportedProcessError(ValueError):
  """The process does not compile to TFF's MapReduce form."""


def _flatten(value, type_spec) -> list:
  """The tensors (and datasets) of a TFF-typed Python value, in binding
  order."""
  if isinstance(type_spec, tff.StructType):
    elements = structure.from_container(value)
    names = [name for name, _ in structure.iter_elements(type_spec)]
    if len(elements) != len(names):
      raise TypeError(f'{value!r} does not match the type {type_spec}.')
    flat = []
    for (name, element_type), (value_name, element) in zip(
        structure.iter_elements(type_spec), structure.iter_elements(elements)):
      if name and value_name and name != value_name:
        raise TypeError(
            f'{value!r} has {value_name!r} where the type {type_spec} has '
            f'{name!r}.')
      flat.extend(_flatten(element, element_type))
    return flat
  if isinstance(type_spec, tff.SequenceType):
    return [tf.data.experimental.to_variant(value)]
  return [value]


def _pack(type_spec, flat: Iterator) -> Any:
  """A `structure.Struct` of `type_spec`'s shape from the flat results."""
  if isinstance(type_spec, tff.StructType):
    return structure.Struct([
        (name, _pack(element_type, flat))
        for name, element_type in structure.iter_elements(type_spec)
    ])
  return next(flat)


def _rename_functions(graph_def, suffix: str):
  """`graph_def` with every library function renamed `<name>_<suffix>`.

  Importing a graph adds its functions to the process-wide function library,
  and computations compiled from different processes (a study's runs) reuse
  names for different definitions, which TensorFlow refuses.
  """
  names = {f.signature.name: f'{f.signature.name}_{suffix}'
           for f in graph_def.library.function}

  def rename_attr(attr):
    if attr.HasField('func') and attr.func.name in names:
      attr.func.name = names[attr.func.name]
    if attr.HasField('list'):
      for func in attr.list.func:
        if func.name in names:
          func.name = names[func.name]

  def rename_nodes(nodes):
    for node in nodes:
      if node.op in names:
        node.op = names[node.op]
      for attr in node.attr.values():
        rename_attr(attr)

  rename_nodes(graph_def.node)
  for function in graph_def.library.function:
    function.signature.name = names[function.signature.name]
    rename_nodes(function.node_def)
    for attr in function.attr.values():
      rename_attr(attr)
  for gradient in graph_def.library.gradient:
    gradient.function_name = names.get(gradient.function_name,
                                       gradient.function_name)
    gradient.gradient_func = names.get(gradient.gradient_func,
                                       gradient.gradient_func)
  return graph_def


def _rename_shared_resources(graph_def, suffix: str):
  """`graph_def` with every resource's shared name suffixed `_<suffix>`.

  TFF gives a computation's variables shared names (`total`, `count`, ...);
  in one process, computations of different processes would share them, and
  fail where the same name has another dtype (a regression task's metric
  against a classification task's).
  """
  nodes = list(graph_def.node)
  for function in graph_def.library.function:
    nodes.extend(function.node_def)
  for node in nodes:
    if 'shared_name' in node.attr and node.attr['shared_name'].s:
      node.attr['shared_name'].s += f'_{suffix}'.encode()
  return graph_def


class TfComputation:
  """A TFF TensorFlow computation as a Python TensorFlow concrete function.

  Called with a Python value of the computation's parameter type (attrs
  classes, OrderedDicts, tensors, `tf.data.Dataset`s), it returns the result
  in the Python containers TFF's own execution context returns.
  """

  def __init__(self, comp: tff.framework.ConcreteComputation,
               result_type: Optional[tff.Type] = None):
    """`result_type`: the result's type with the Python containers wanted,
    when the computation's own type lost them (TFF's compiled forms)."""
    proto = comp.to_building_block().proto
    if proto.WhichOneof('computation') != 'tensorflow':
      raise UnsupportedProcessError(
          f'expected a TensorFlow computation, got {proto.WhichOneof("computation")}.')
    self.type_signature = comp.type_signature
    self._result_type = result_type or comp.type_signature.result
    tf_proto = proto.tensorflow
    graph_def = serialization_utils.unpack_graph_def(tf_proto.graph_def)
    # TFF pins some ops to the CPU when it serializes; cleared, TensorFlow
    # places every op (client training, clipping, noise) where it can.
    for node in graph_def.node:
      node.device = ''
    for function in graph_def.library.function:
      for node in function.node_def:
        node.device = ''
    suffix = uuid.uuid4().hex[:12]
    graph_def = _rename_shared_resources(
        _rename_functions(graph_def, suffix), suffix)
    parameter = self.type_signature.parameter
    input_names = (
        tensorflow_utils.extract_tensor_names_from_binding(tf_proto.parameter)
        if parameter is not None else []
    )
    output_names = tensorflow_utils.extract_tensor_names_from_binding(
        tf_proto.result)
    token = tf_proto.session_token_tensor_name

    init_op = tf_proto.initialize_op
    imported_init = []

    def import_graph(*inputs):
      input_map = dict(zip(input_names, inputs))
      if token:
        input_map[token] = tf.constant('in-process')
      # Control dependencies on a parameter follow it, as in TFF's own
      # import of a computation.
      input_map = graph_utils.add_control_dep_mappings(input_map)
      imported = tf.graph_util.import_graph_def(
          graph_def, input_map=input_map,
          return_elements=output_names + ([init_op] if init_op else []),
          name='imported')
      if init_op:
        imported_init.append(imported.pop())
      return imported

    input_specs = [
        tf.TensorSpec(None, tf.variant) if isinstance(t, tff.SequenceType)
        else tf.TensorSpec(t.shape, t.dtype)
        for t in _leaf_types(parameter)
    ] if parameter is not None else []
    self._function = tf.compat.v1.wrap_function(import_graph, input_specs)
    # TFF initializes a computation's variables before every call. Its
    # variables are shared resources (TFF gives them shared names), so an
    # initializer call followed by the outputs' call is that; making every
    # node depend on the initializer instead breaks the frames of lowered
    # while loops.
    self._initialize = (
        self._function.prune(self._function.inputs[:len(input_specs)],
                             imported_init[0])
        if init_op else None)

  @property
  def stateless(self) -> bool:
    """Whether the computation has no variables, so calls may overlap."""
    return self._initialize is None

  def __call__(self, *args):
    parameter = self.type_signature.parameter
    if parameter is None:
      flat = []
    else:
      value = args[0] if len(args) == 1 else list(args)
      flat = _flatten(value, parameter)
    return self.pack(self.call_flat(flat))

  def call_flat(self, flat: list) -> list:
    """The result's tensors, in binding order, of the parameter's
    (`_flatten`): what one computation's result passes to another's
    parameter without Python containers in between."""
    if self._initialize is not None:
      # A pruned function declares no parameters, though it takes the feeds.
      self._initialize._call_flat(  # pylint: disable=protected-access
          [tf.convert_to_tensor(t) for t in flat],
          self._initialize.captured_inputs)
    outputs = self._function(*flat)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

  def pack(self, outputs: list):
    """The result, in TFF's Python containers, of its tensors."""
    packed = _pack(self._result_type, iter(outputs))
    return type_conversions.type_to_py_container(packed, self._result_type)


def _leaf_types(type_spec) -> list:
  if isinstance(type_spec, tff.StructType):
    return [leaf for _, t in structure.iter_elements(type_spec)
            for leaf in _leaf_types(t)]
  return [type_spec]


class InProcessLearningProcess:
  """A `tff.learning` LearningProcess run in this process, no TFF worker.

  Offers what the training loop and the evaluator use of a LearningProcess:
  `initialize()`, `next(state, client_data)` (one element of the process's
  client data per TFF client), `get_model_weights` and `set_model_weights`,
  with the states and metrics in TFF's Python containers.

  Raises:
    UnsupportedProcessError: the process does not compile to MapReduce form
      (the reason is in the message).
  """

  def __init__(self, process: tff.learning.templates.LearningProcess,
               parallel_clients: Optional[int] = None):
    """`parallel_clients`: how many TFF clients' graphs may run at once
    (None: one per core); clients whose graph has variables run one at a
    time."""
    next_fn = test_compiler.replace_secure_intrinsics_with_bodies(process.next)
    try:
      form = tff.backends.mapreduce.get_map_reduce_form_for_computation(next_fn)
      initialize = tff.backends.mapreduce.get_state_initialization_computation(
          process.initialize)
    except (TypeError, ValueError, NotImplementedError,
            tff.backends.mapreduce.MapReduceFormCompilationError) as e:
      raise UnsupportedProcessError(
          'the process does not compile to TFF\'s MapReduce form '
          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
      ) from e
    for secure in (form.secure_sum_bitwidth, form.secure_sum_max_input,
                   form.secure_modular_sum_modulus):
      # Replaced above by checked plain sums; anything left is not simulated.
      if _leaf_types(secure.type_signature.result):
        raise UnsupportedProcessError(
            'the process keeps a secure sum that TFF\'s test bodies did not '
            'replace.')
    state_type = process.state_type.member
    result_type = process.next.type_signature.result
    self._initialize = TfComputation(initialize, state_type)
    self._prepare = TfComputation(form.prepare)
    self._work = TfComputation(form.work)
    self._zero = TfComputation(form.zero)
    self._accumulate = TfComputation(form.accumulate)
    self._report = TfComputation(form.report)
    self._update = TfComputation(form.update, _unplaced(result_type))
    self._get_model_weights = TfComputation(process.get_model_weights)
    self._set_model_weights = TfComputation(
        process.set_model_weights, state_type)
    self.state_type = process.state_type
    # The work's result is <update, secure sums' inputs>, and the latter hold
    # no tensors: they were replaced by plain sums.
    self._update_leaves = len(_leaf_types(self._work.type_signature.result[0]))
    # A client graph with variables re-initializes them on every call (TFF
    # names them, so calls share them): its clients run one at a time.
    parallel_clients = parallel_clients or os.cpu_count() or 1
    self._client_threads = (
        _client_threads(parallel_clients)
        if self._work.stateless and parallel_clients > 1 else None)

  def initialize(self):
    return self._initialize()

  def get_model_weights(self, state) -> tff.learning.models.ModelWeights:
    return self._get_model_weights(state)

  def set_model_weights(self, state, model_weights):
    return self._set_model_weights(state, model_weights)

  def next(self, state, client_data: Sequence[Any]):
    """One round: `client_data` holds one value per TFF client."""
    # The parts pass tensors in binding order, as their parameter and result
    # types line up in the MapReduce form; only the state and the data are
    # flattened, and only the result is packed.
    state_tensors = _flatten(state, self._prepare.type_signature.parameter)
    client_input = self._prepare.call_flat(state_tensors)
    data_type = self._work.type_signature.parameter[0]

    def work(data):
      return self._work.call_flat(
          _flatten(data, data_type) + client_input)[:self._update_leaves]

    # As TFF's worker does, the clients' graphs run at once (TensorFlow
    # releases the GIL): this keeps the cores busy where one client's small
    # ops (a GRU's steps) would not.
    updates = (map(work, client_data) if self._client_threads is None
               else self._client_threads.map(work, client_data))
    accumulator = self._zero.call_flat([])
    # In the clients' order: the sum does not depend on which ends first.
    for update in updates:
      accumulator = self._accumulate.call_flat(accumulator + update)
    aggregate = self._report.call_flat(accumulator)
    return self._update.pack(
        self._update.call_flat(state_tensors + aggregate))


@functools.cache
def _client_threads(count: int) -> concurrent.futures.ThreadPoolExecutor:
  """Threads for `count` clients' graphs at once, shared by the processes of
  a study (a round waits for its clients, so they never overlap)."""
  return concurrent.futures.ThreadPoolExecutor(
      max_workers=count, thread_name_prefix='tff_client')


def _unplaced(type_spec):
  """`type_spec` with every federated type replaced by its member."""
  if isinstance(type_spec, tff.FederatedType):
    return type_spec.member
  if isinstance(type_spec, tff.StructType):
    elements = [(name, _unplaced(t))
                for name, t in structure.iter_elements(type_spec)]
    container = getattr(type_spec, 'python_container', None)
    if container is None:
      return tff.StructType(elements)
    return tff.StructWithPythonType(elements, container)
  return type_spec


class InProcessEvaluator:
  """`process.FederatedEvaluator` in this process, on the model's own API.

  TFF's federated evaluation runs `forward_pass` over every held-out client's
  batches, sums the model's unfinalized metrics over clients and finalizes
  the sums. Here the held-out examples are pooled and rebatched into batches
  of `batch_size`, held in memory, and the model's metrics are summed over
  them: the same per-example sums (up to float32 summation order), in a few
  graph calls instead of a graph loop over every client's few examples
  (Shakespeare's 715 held-out roles: 3.2 s on 2 cores before, 0.86 s). So
  it reports TFF's metrics except `num_batches`, which counts batches, not
  examples. It needs no MapReduce compilation.
  """

  def __init__(
      self,
      model_fn: Callable[[], tff.learning.models.VariableModel],
      client_datasets: list,
      batch_size: int = 512,
  ):
    if not client_datasets:
      raise ValueError('evaluation needs at least one held-out client dataset.')
    model = model_fn()
    examples = functools.reduce(
        tf.data.Dataset.concatenate, client_datasets).unbatch().batch(batch_size)
    self._batches = list(examples)

    @tf.function
    def start(model_weights):
      model_weights.assign_weights_to(model)
      model.reset_metrics()

    @tf.function(input_signature=[examples.element_spec])
    def add_batch(batch):
      model.forward_pass(batch, training=False)

    @tf.function
    def unfinalized_metrics():
      metrics = model.report_local_unfinalized_metrics()
      metrics.pop('num_batches', None)
      return metrics

    self._start = start
    self._add_batch = add_batch
    self._unfinalized_metrics = unfinalized_metrics
    self._finalizers = model.metric_finalizers()
    self._finalize = None

  def __call__(
      self, model_weights: tff.learning.models.ModelWeights
  ) -> dict[str, float]:
    self._start(tff.learning.models.ModelWeights(
        trainable=list(model_weights.trainable),
        non_trainable=list(model_weights.non_trainable)))
    for batch in self._batches:
      self._add_batch(batch)
    unfinalized = self._unfinalized_metrics()
    if self._finalize is None:
      self._finalize = _GraphFunction(
          lambda values: {name: self._finalizers[name](value)
                          for name, value in values.items()},
          unfinalized)
    return {name: float(value)
            for name, value in self._finalize(unfinalized).items()}


class _GraphFunction:
  """`fn` built once into a TF1 graph and run in its session.

  For TFF's metric finalizers: each builds a Keras metric (variables) when
  traced, which a `tf.function` refuses on its second trace; a graph built
  once keeps them.
  """

  def __init__(self, fn: Callable[[Any], Any], example_arg):
    graph = tf.Graph()
    with graph.as_default():
      self._placeholders = tf.nest.map_structure(
          lambda t: tf.compat.v1.placeholder(t.dtype, t.shape), example_arg)
      self._outputs = fn(self._placeholders)
      initialize = tf.compat.v1.global_variables_initializer()
    self._session = tf.compat.v1.Session(graph=graph)
    self._session.run(initialize)

  def __call__(self, arg):
    feed = dict(zip(tf.nest.flatten(self._placeholders),
                    [np.asarray(t) for t in tf.nest.flatten(arg)]))
    return self._session.run(self._outputs, feed)
