r"""Per-layer norms of the clients' updates over training: where clipping bites.

  python -m experiments.layer_norms --output_dir=runs/layer_norms

Trains one run (every flag of `experiments.train` applies; default: FEMNIST,
Gaussian aggregator with per-layer adaptive clipping) and, before each round,
measures the L2 norm of every tensor of each sampled client's *unclipped*
update from the current model. These norms describe single clients and are not
differentially private: they are for choosing clips, not for release.

Writes OUTPUT_DIR/flags.json, OUTPUT_DIR/layer_norms.csv (round, client, layer,
norm), OUTPUT_DIR/layer_norms.png (one box per layer over all rounds and
clients) and the run's own outputs under OUTPUT_DIR/run/.
"""

import csv
import os
import sys

from absl import app
from absl import flags
import tensorflow as tf  # noqa: F401  # pylint: disable=unused-import  # Before absl starts: Keras breaks when TF is first imported inside main.

from dp_fedavg import diagnostics
from dp_fedavg import interrupts
from dp_fedavg import outputs
from dp_fedavg import run_config
from experiments import plots
from experiments import privacy_flags
from experiments import runner
from experiments import studies
from experiments import training_flags

NORMS_FILE = 'layer_norms.csv'
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', 'runs/layer_norms', 'Where the study\'s results go.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an earlier study\'s results in output_dir.')

STUDY_DEFAULTS = dict(
    task='femnist', clients_per_round=40, sampling='uniform', rounds=10,
    clip=2.0, clipping='per_layer_adaptive', local_epochs=5, batch_size=10,
    client_lr=0.05, server_momentum=0.0, eval_every=5,
)


def study_error(config: run_config.RunConfig) -> str | None:
  error = training_flags.flag_error(config)
  if error:
    return error
  if config.example_level:
    return (
        'layer_norms measures the per-layer norms of whole client updates, '
        'what user-level clipping bounds; run it with --privacy_unit=user.'
    )
  if run_config.choose_engine(_per_user(config)).stacked_users:
    return (
        'layer_norms measures each user\'s update from its own dataset; run '
        'it with --engine=standard or auto.'
    )
  return outputs.output_dir_error(_OUTPUT_DIR.value, NORMS_FILE,
                                 _OVERWRITE.value)


def _per_user(config: run_config.RunConfig) -> run_config.RunConfig:
  """The probe reads each user's own dataset: auto picks the standard
  engine."""
  return config.replace(engine='standard') if config.engine == 'auto' else config


def main(argv):
  config = _per_user(training_flags.config_from_flags())
  task = training_flags.start_or_exit(argv, study_error(config), config)
  plan = runner.plan_or_exit(config, task, privacy_flags.exit_with_usage_error)
  output_dir = _OUTPUT_DIR.value
  study_values = studies.write_flags(output_dir, sys.modules[__name__])
  rows = []
  # A signal stops training after the round in progress (a second one at
  # once); the norms of the rounds done are written all the same.
  with interrupts.stop_on_signals() as stop:
    try:
      with runner.execution_context(config):
        probe = diagnostics.UpdateNormProbe(task.model_fn, config.client_lr)

        def record_norms(round_num, model_weights, client_datasets):
          norms = probe(model_weights, client_datasets)
          rows.extend(
              (round_num, client, layer, float(norm))
              for client, client_norms in enumerate(norms)
              for layer, norm in zip(probe.layer_names, client_norms)
          )

        interrupted = runner.Runner(task).run(
            plan, os.path.join(output_dir, 'run'), study_values,
            overwrite=True, inspect_round=record_norms,
            stop_requested=stop.requested,
        ).interrupted
    except KeyboardInterrupt:  # A second signal.
      interrupted = True
  if not rows:
    reason = (f'{stop.signal.name}: stopped before the first round'
              if interrupted else 'no round ran (the privacy budget allows none)')
    print(f'layer_norms.py: {reason}; no norms were measured', file=sys.stderr)
    sys.exit(stop.exit_code if interrupted else 1)
  norms_path = os.path.join(output_dir, NORMS_FILE)
  with open(norms_path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(('round', 'client', 'layer', 'norm'))
    writer.writerows(rows)
  rounds = len({row[0] for row in rows})
  by_layer = {name: [] for name in probe.layer_names}
  for _, _, layer, norm in rows:
    by_layer[layer].append(norm)
  figure = os.path.join(output_dir, 'layer_norms.png')
  plots.layer_norm_boxes(
      by_layer, figure,
      f'{task.name}: per-layer client update norms, {rounds} rounds',
  )
  if interrupted:
    print(f'layer_norms.py: {stop.signal.name}: stopped with the norms of '
          f'{rounds} of {config.rounds} rounds: {norms_path}, figure: '
          f'{figure}', file=sys.stderr)
    sys.exit(stop.exit_code)
  print(f'norms: {norms_path}\nfigure: {figure}')


if __name__ == '__main__':
  for name, value in STUDY_DEFAULTS.items():
    flags.FLAGS.set_default(name, value)
  app.run(main)
