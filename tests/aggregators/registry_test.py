"""The mechanism registry: entries, parameters, checks and ledger pairing."""

import dataclasses
import math

from absl.testing import parameterized
import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from aggregators import checks
from aggregators import distributed_dp
from aggregators import gaussian
from aggregators import laplace
from aggregators import registry
from dp_fedavg import accounting

# model_dimension: the values of _VALUE_TYPE, as a task's update_dimension.
_SETTING = registry.Setting(expected_clients_per_round=20, model_dimension=55)
_VALUE_TYPE = tff.types.to_type([(np.float32, [10, 5]), (np.float32, [5])])


class RegistryTest(tf.test.TestCase, parameterized.TestCase):

  def test_built_in_mechanisms(self):
    self.assertEqual(
        set(registry.names()),
        {'none', 'gaussian_fixed', 'gaussian_adaptive', 'secure_gaussian',
         'laplace', 'distributed_dp', 'dp_ftrl_tree', 'banded_mf'},
    )

  def test_unknown_name_is_an_argument_error_naming_the_choices(self):
    with self.assertRaisesRegex(checks.ArgumentError,
                                'aggregator must be one of none, banded_mf, distributed_dp, dp_ftrl_tree'):
      registry.get('skellam')

  def test_a_name_registers_once(self):
    with self.assertRaisesRegex(ValueError, 'already registered'):
      registry.register(registry.get('laplace'))

  def test_shared_parameters_must_agree(self):

    @dataclasses.dataclass(frozen=True)
    class Clashing:
      clip: float = registry.parameter(2.0, 'another default')

    with self.assertRaisesRegex(ValueError, 'clip differs from'):
      registry.register(dataclasses.replace(
          registry.get('gaussian_fixed'), name='clashing', params_type=Clashing
      ))
    self.assertNotIn('clashing', registry.names())

  def test_parameters_list_each_name_once_with_its_mechanisms(self):
    infos = {info.name: info for info in registry.parameters()}
    self.assertLen(infos, len(registry.parameters()))
    self.assertEqual(
        infos['clip'].mechanisms,
        ('banded_mf', 'distributed_dp', 'dp_ftrl_tree', 'gaussian_fixed',
         'secure_gaussian'),
    )
    self.assertEqual(infos['epsilon_per_round'].mechanisms, ('laplace',))
    self.assertEqual(infos['ddp_beta'].default, math.exp(-0.5))
    self.assertIsNone(infos['clipped_count_stddev'].default)
    self.assertTrue(all(info.help for info in infos.values()))

  @parameterized.named_parameters(
      ('fixed', 'gaussian_fixed', dict(clip=0.0), 'clip',
       'a finite number > 0'),
      ('adaptive_initial_clip', 'gaussian_adaptive', dict(initial_clip=-1.0),
       'initial_clip', 'a finite number > 0'),
      ('adaptive_learning_rate', 'gaussian_adaptive',
       dict(clip_learning_rate=-0.1), 'clip_learning_rate',
       'a finite number >= 0'),
      ('quantile', 'gaussian_adaptive', dict(target_quantile=1.5),
       'target_quantile', 'in [0, 1]'),
      ('secure_adaptive_clip', 'secure_gaussian',
       dict(adaptive_clip=True, initial_clip=0.0), 'initial_clip',
       'a finite number > 0'),
      ('secure_fixed_clip', 'secure_gaussian', dict(clip=0.0), 'clip',
       'a finite number > 0'),
      ('clipping', 'gaussian_fixed', dict(clipping='per_unit'), 'clipping',
       'one of flat, per_layer_uniform, per_layer_adaptive'),
      ('laplace', 'laplace', dict(epsilon_per_round=0.0), 'epsilon_per_round',
       'a finite number > 0'),
      ('ddp_beta', 'distributed_dp', dict(ddp_beta=1.0), 'ddp_beta',
       'in [0, 1)'),
      ('ddp_mechanism', 'distributed_dp', dict(ddp_mechanism='laplace'),
       'ddp_mechanism', 'one of ddgauss, skellam'),
      ('bits', 'distributed_dp', dict(bits=40), 'bits', 'an integer in [2, 30]'),
  )
  def test_factory_check_is_restated_for_the_parameter(
      self, name, values, parameter, allowed):
    mechanism = registry.get(name)
    with self.assertRaises(checks.ArgumentError) as raised:
      mechanism.check(mechanism.params(values), _SETTING)
    self.assertEqual(raised.exception.name, parameter)
    self.assertEqual(raised.exception.allowed, allowed)

  @parameterized.named_parameters(
      ('secure_gaussian', 'secure_gaussian', 'secure sum'),
      ('distributed_dp', 'distributed_dp', 'secure sum'),
  )
  def test_secure_sums_refuse_stacked_users_with_the_factorys_reason(
      self, name, reason):
    mechanism = registry.get(name)
    self.assertTrue(mechanism.secure_sums)
    refusal = mechanism.engine_refusal(mechanism.params({}), _SETTING)
    self.assertIn(reason, refusal)
    self.assertIn('stacked users', refusal)

  @parameterized.parameters('none', 'gaussian_fixed', 'gaussian_adaptive',
                            'laplace')
  def test_plain_sums_take_stacked_users(self, name):
    mechanism = registry.get(name)
    self.assertFalse(mechanism.secure_sums)
    self.assertIsNone(mechanism.engine_refusal(mechanism.params({}), _SETTING))

  @parameterized.named_parameters(
      ('gaussian', 'gaussian_fixed', dict(noise_multiplier=1.3), 1.3),
      ('laplace', 'laplace', dict(epsilon_per_round=0.25), 4.0),
      ('none', 'none', {}, 0.0),
  )
  def test_noise_of_params_and_back(self, name, values, noise):
    mechanism = registry.get(name)
    params = mechanism.params(values)
    self.assertAlmostEqual(mechanism.noise_of(params), noise)
    if mechanism.noise is not None:
      self.assertEqual(
          mechanism.with_noise(mechanism.params({}), noise), params
      )

  @parameterized.named_parameters(
      ('fixed', 'gaussian_fixed', {}, accounting.SampledRounds,
       dp_accounting.GaussianDpEvent(1.0)),
      # Local DP: one message under replacement, sensitivity 2 S.
      ('client_noise', 'gaussian_fixed', dict(noise_placement='client'),
       accounting.LocalRounds, dp_accounting.GaussianDpEvent(0.5)),
      # sigma_b = max(0.05 * 20, 5 * 1) = 5; z_update from the split.
      ('adaptive', 'gaussian_adaptive', {}, accounting.SampledRounds,
       dp_accounting.ComposedDpEvent([
           dp_accounting.GaussianDpEvent((1.0 - 10.0**-2) ** -0.5),
           dp_accounting.GaussianDpEvent(10.0),
       ])),
      ('secure', 'secure_gaussian', dict(noise_multiplier=2.0),
       accounting.SampledRounds, dp_accounting.GaussianDpEvent(2.0)),
      ('laplace', 'laplace', dict(epsilon_per_round=0.5),
       accounting.SampledRounds, dp_accounting.LaplaceDpEvent(2.0)),
      ('none', 'none', {}, accounting.SampledRounds,
       dp_accounting.NonPrivateDpEvent()),
  )
  def test_ledger_states_the_mechanisms_event(
      self, name, values, ledger_type, event):
    mechanism = registry.get(name)
    ledger = mechanism.build_ledger(mechanism.params(values), _SETTING)
    self.assertIsInstance(ledger, ledger_type)
    self.assertEqual(repr(ledger.planned_event), repr(event))

  @parameterized.named_parameters(
      ('fixed', 'gaussian_fixed', dict(noise_multiplier=1.7)),
      ('client_noise', 'gaussian_fixed',
       dict(noise_multiplier=1.7, noise_placement='client')),
      ('adaptive', 'gaussian_adaptive', dict(noise_multiplier=1.7)),
      ('secure_adaptive', 'secure_gaussian',
       dict(noise_multiplier=1.7, adaptive_clip=True)),
      ('laplace', 'laplace', dict(epsilon_per_round=0.3)),
      ('distributed_dp', 'distributed_dp', dict(noise_multiplier=1.7)),
  )
  def test_ledger_of_the_factorys_state_is_the_planned_event(self, name, values):
    """The factory and its ledger come from one entry: what the process's
    state says it ran is what was planned."""
    mechanism = registry.get(name)
    params = mechanism.params(values)
    factory = mechanism.build_factory(params, _SETTING)
    ledger = mechanism.build_ledger(params, _SETTING)
    state = factory.create(_VALUE_TYPE).initialize()
    self.assertEqual(
        repr(accounting.as_python_floats(ledger.event_of_state(state))),
        repr(accounting.as_python_floats(ledger.planned_event)),
    )

  def test_distributed_dp_ledger_needs_the_model_size(self):
    mechanism = registry.get('distributed_dp')
    with self.assertRaisesRegex(ValueError, 'model\'s size'):
      mechanism.build_ledger(
          mechanism.params({}), registry.Setting(expected_clients_per_round=20)
      )

  @parameterized.named_parameters(
      ('gaussian_fixed', 'gaussian_fixed', gaussian.GaussianFactory),
      ('secure_gaussian', 'secure_gaussian', gaussian.GaussianFactory),
      ('laplace', 'laplace', laplace.LaplaceFactory),
      ('distributed_dp', 'distributed_dp', distributed_dp.DistributedDpFactory),
  )
  def test_factory_type(self, name, factory_type):
    mechanism = registry.get(name)
    self.assertIsInstance(
        mechanism.build_factory(mechanism.params({}), _SETTING), factory_type
    )

  def test_none_is_the_plain_mean(self):
    mechanism = registry.get('none')
    self.assertIsNone(mechanism.build_factory(mechanism.params({}), _SETTING))
    self.assertIsNone(mechanism.noise)


if __name__ == '__main__':
  tf.test.main()
