"""Faults a user meets: unusable output directories, damaged data and
checkpoints, interrupts, and extending a finished run."""

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import attr
import numpy as np

from aggregators import distributed_dp
from dp_fedavg import accounting
from dp_fedavg import checkpoints
from dp_fedavg import interrupts
from dp_fedavg import outputs
from dp_fedavg import run_config
from dp_fedavg import sampling
from dp_fedavg.tasks import cifar10
from dp_fedavg.tasks import client_data
from dp_fedavg.tasks import custom
from dp_fedavg.tasks import femnist
from dp_fedavg.tasks import shakespeare
from experiments import runner
from experiments import train
from experiments import training_flags
from tests.experiments import binaries

# Digits rounds on the standard engine (a TFF worker), eight of them.
_RUN = ('--rounds=8', '--num_clients=40', '--clients_per_round=8',
        '--eval_every=4', '--seed=5', '--engine=standard')


def _metrics(output_dir):
  with open(os.path.join(output_dir, 'metrics.csv')) as f:
    return [(r['round'], r['train_loss'], r['epsilon'], r['eval_accuracy'])
            for r in csv.DictReader(f)]


def _signal_group_once_written(process, path, signum, stderr_path,
                               ready=lambda: True) -> str:
  """Signals `process`'s group (as a terminal would) once `path` exists and
  `ready()`, waits for it to end and returns its stderr."""
  deadline = time.monotonic() + 240
  while not (os.path.exists(path) and ready()):
    if time.monotonic() > deadline:
      os.killpg(process.pid, signal.SIGKILL)
      raise TimeoutError(f'{path} not written (or not ready) in 240 s')
    time.sleep(0.02)
  os.killpg(process.pid, signum)
  process.wait(timeout=120)
  with open(stderr_path) as f:
    return f.read()


def _garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'\x00not what it should be\xff' * 50)
  return path


class OutputDirTest(absltest.TestCase):

  def test_a_directory_that_cannot_be_made_is_one_line(self):
    blocker = self.create_tempfile('a_file').full_path
    error = outputs.output_dir_error(os.path.join(blocker, 'run'))
    self.assertStartsWith(error, f'--output_dir={blocker}/run cannot be '
                          'created or written to: ')
    self.assertNotIn('\n', error)
    self.assertIsNone(outputs.output_dir_error(
        os.path.join(self.create_tempdir().full_path, 'new', 'run')))

  def test_train_exits_2_before_training(self):
    blocker = self.create_tempfile('a_file').full_path
    result = binaries.run('train', f'--output_dir={blocker}/run')
    self.assertEqual(result.returncode, 2)
    last = result.stderr.strip().splitlines()[-1]
    self.assertIn(f'--output_dir={blocker}/run cannot be created', last)
    self.assertNotIn('Traceback', result.stderr)


class DamagedDataTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('femnist', lambda d: _garbage(os.path.join(d, femnist.FILE_NAME)),
       lambda d: femnist.build_task(data_dir=d), 'is not an .npz file'),
      ('shakespeare', lambda d: [
          _garbage(os.path.join(d, f'shakespeare_{s}.h5'))
          for s in ('train', 'test')][0],
       lambda d: shakespeare.build_task(data_dir=d), 'is not an HDF5 file'),
      ('cifar10', lambda d: _garbage(os.path.join(d, 'data_batch_1')),
       lambda d: cifar10.read_batch(os.path.join(d, 'data_batch_1')),
       'is not a pickled CIFAR-10 batch'),
  )
  def test_is_one_line_naming_the_file(self, damage, load, message):
    directory = self.create_tempdir().full_path
    path = damage(directory)
    with self.assertRaisesRegex(client_data.DataCorruptError,
                                message) as raised:
      load(directory)
    self.assertStartsWith(str(raised.exception), path)
    self.assertNotIn('\n', str(raised.exception))

  def test_custom_sqlite_and_npz(self):
    directory = self.create_tempdir().full_path
    model = 'tests.dp_fedavg.tasks.custom_test:small_model'
    for name, error in (('data.sqlite', 'not TFF SQLite client data'),
                        ('data.npz', 'not a zip archive')):
      path = _garbage(os.path.join(directory, name))
      with self.assertRaisesRegex(ValueError, error) as raised:
        custom.build_task(path, model)
      self.assertIn(path, str(raised.exception))

  def test_train_exits_2_on_a_damaged_file(self):
    directory = self.create_tempdir().full_path
    path = _garbage(os.path.join(directory, femnist.FILE_NAME))
    result = binaries.run(
        'train', '--task=femnist', f'--data_dir={directory}',
        f'--output_dir={self.create_tempdir().full_path}')
    self.assertEqual(result.returncode, 2)
    self.assertIn(f'{path} is not an .npz file',
                  result.stderr.strip().splitlines()[-1])
    self.assertNotIn('Traceback', result.stderr)

  def test_no_checkpoint_that_loads_is_an_error(self):
    output_dir = self.create_tempdir().full_path
    _garbage(os.path.join(output_dir, checkpoints.CHECKPOINT_DIR,
                          'program_state_3', 'saved_model.pb'))
    with self.assertRaisesRegex(checkpoints.CorruptCheckpointError,
                                'none of its 1 checkpoints loads'):
      checkpoints.Checkpointer(output_dir).restore_latest(
          {'weights': np.zeros(3, np.float32)}, ledger=None)


class DivergenceTest(parameterized.TestCase):

  @parameterized.parameters('standard', 'vectorized')
  def test_every_client_diverging_stops_with_advice(self, engine):
    output_dir = self.create_tempdir().full_path
    result = binaries.run(
        'train', '--client_lr=1e30', '--rounds=6', '--max_diverged_rounds=2',
        f'--engine={engine}', f'--output_dir={output_dir}')
    self.assertEqual(result.returncode, 1, result.stderr[-3000:])
    self.assertEndsWith(
        result.stderr.strip().splitlines()[-1],
        'every client\'s update was not finite in the last 2 rounds (training '
        f'diverged); try a smaller --client_lr (now 1e+30). Metrics are in '
        f'{output_dir}.')
    self.assertIn('clients\' updates were not finite', result.stderr)
    with open(os.path.join(output_dir, 'metrics.csv')) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 2)
    for row in rows:
      self.assertEqual(row['diverged_clients'], row['cohort_size'])
      self.assertEqual(row['train_loss'], 'nan')  # Not 0.0: nothing trained.


class StopOnSignalsTest(absltest.TestCase):

  def test_first_signal_asks_to_stop_and_a_second_stops_at_once(self):
    previous = signal.getsignal(signal.SIGINT)
    with interrupts.stop_on_signals() as stop:
      self.assertFalse(stop.requested())
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)  # Python runs the handler between instructions.
      self.assertTrue(stop.requested())
      self.assertEqual(stop.exit_code, 143)
      with self.assertRaises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    self.assertIs(signal.getsignal(signal.SIGINT), previous)


class DropoutTest(absltest.TestCase):

  def test_dropouts_are_seeded_at_the_rate(self):
    cohort = np.arange(2000)
    kept = sampling.reporting_clients(cohort, 0.3, seed=4, round_num=7)
    np.testing.assert_array_equal(
        kept, sampling.reporting_clients(cohort, 0.3, seed=4, round_num=7))
    self.assertFalse(np.array_equal(
        kept, sampling.reporting_clients(cohort, 0.3, seed=4, round_num=8)))
    # Binomial(2000, 0.7): within 5 standard errors.
    self.assertLess(abs(len(kept) - 1400), 5 * np.sqrt(2000 * 0.3 * 0.7))
    self.assertIs(sampling.reporting_clients(cohort, 0.0, 4, 7), cohort)

  def _run(self, **values):
    config = run_config.with_defaults(
        task='digits', rounds=3, clients_per_round=10, eval_every=3, seed=2,
        **values)
    task = training_flags.build_task_or_exit(config)
    plan = runner.PrivacyPlan.build(
        config, len(task.train_data.client_ids), task.update_dimension)
    with runner.execution_context(config):
      return task, runner.Runner(task).run(
          plan, self.create_tempdir().full_path, {})

  def test_central_dp_epsilon_is_that_of_the_sampled_clients(self):
    _, plain = self._run(engine='inprocess')
    _, dropped = self._run(engine='inprocess', dropout_rate=0.3)
    for a, b in zip(plain.results, dropped.results):
      self.assertEqual(a.epsilon, b.epsilon)
      self.assertEqual(a.cohort_size, b.cohort_size + b.dropped_clients)
    self.assertGreater(sum(r.dropped_clients for r in dropped.results), 0)

  def test_distributed_dp_composes_the_noise_that_arrived(self):
    ddp = dict(aggregator='distributed_dp', sampling='uniform',
               ddp_dropout_tolerance=0.2)
    task, whole = self._run(**ddp)
    with self.assertLogs(level='WARNING') as logs:
      _, dropped = self._run(**ddp, dropout_rate=0.6)
    self.assertTrue(any('more than the tolerance allows' in line
                        for line in logs.output))
    # Directly: the stated round (8 of 10 shares) with the shares of the
    # clients that reported instead.
    stated = distributed_dp.round_dp_event(
        1.0, 1.0, 10, task.update_dimension, dropout_tolerance=0.2)
    self.assertEqual(stated.num_clients, 8)
    direct = accounting.PrivacyAccountant(
        sampling.SamplingScheme.UNIFORM, 100, 10, 1e-5)
    for result in dropped.results:
      direct.compose_round(
          attr.evolve(stated, num_clients=max(result.cohort_size, 1)))
    self.assertAlmostEqual(dropped.epsilon, direct.epsilon(), places=9)
    self.assertGreater(dropped.epsilon, whole.epsilon)


class InterruptAndExtendTest(absltest.TestCase):
  """One uninterrupted run of eight rounds against the same run stopped by
  a signal and continued, and against a shorter run extended to eight."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._whole = absltest.get_default_test_tmpdir() + '/whole'
    result = binaries.run('train', f'--output_dir={cls._whole}', '--overwrite',
                          '--checkpoint_every=4', *_RUN)
    assert result.returncode == 0, result.stderr[-3000:]

  def _start_in_own_group(self, output_dir, stderr_path):
    # Its own process group, signalled as a terminal's Ctrl-C would be: to
    # every process of the group.
    with open(stderr_path, 'w') as stderr:
      return subprocess.Popen(
          [sys.executable, '-m', 'experiments.train',
           f'--output_dir={output_dir}', *_RUN],
          cwd=binaries.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
          start_new_session=True)

  def _stop_after_first_round(self):
    output_dir = self.create_tempdir().full_path
    stderr_path = os.path.join(self.create_tempdir().full_path, 'stderr')
    run = self._start_in_own_group(output_dir, stderr_path)
    stderr = _signal_group_once_written(
        run, os.path.join(output_dir, 'metrics.csv'), signal.SIGINT,
        stderr_path)
    return output_dir, run.returncode, stderr

  def test_sigint_stops_cleanly_and_the_printed_command_continues_it(self):
    output_dir, code, stderr = self._stop_after_first_round()
    self.assertEqual(code, 130, stderr[-3000:])
    self.assertNotIn('Traceback', stderr)
    last = stderr.strip().splitlines()[-1]
    self.assertRegex(last, r'^train\.py: SIGINT: stopped after round \d; last '
                     'checkpoint in ')
    rounds_done = len(_metrics(output_dir))
    self.assertLess(rounds_done, 8)
    self.assertFalse(os.path.exists(os.path.join(output_dir, outputs.MODEL_FILE)))
    command = shlex.split(last.split('continue with: ')[1])
    self.assertEqual(command[:3], ['python', '-m', 'experiments.train'])
    resumed = subprocess.run(
        [sys.executable, *command[1:]], cwd=binaries.REPO_ROOT,
        capture_output=True, text=True, timeout=300)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    self.assertIn(f'resumed after round {rounds_done}', resumed.stderr)
    self.assertEqual(_metrics(output_dir), _metrics(self._whole))


  def test_a_shorter_run_extends_past_a_damaged_checkpoint(self):
    output_dir = self.create_tempdir().full_path
    short = [arg for arg in _RUN if not arg.startswith('--rounds')]
    first = binaries.run('train', f'--output_dir={output_dir}', '--rounds=6',
                         '--checkpoint_every=3', *short)
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    # The latest checkpoint (round 6) is damaged: round 3's is used.
    latest = os.path.join(output_dir, checkpoints.CHECKPOINT_DIR,
                          'program_state_6')
    for name in os.listdir(latest):
      if os.path.isfile(os.path.join(latest, name)):
        _garbage(os.path.join(latest, name))
    with flagsaver.flagsaver(
        output_dir=output_dir, resume=True, rounds=2, checkpoint_every=3,
        num_clients=40, clients_per_round=8, eval_every=4, seed=5,
        engine='standard'):
      self.assertEqual(
          train.flag_error(training_flags.config_from_flags()),
          '--rounds=2 is below the 6 rounds the run has done (run: '
          '--rounds=6).')
    extended = binaries.run('train', f'--output_dir={output_dir}', '--resume',
                            '--rounds=8', '--checkpoint_every=3', *short)
    self.assertEqual(extended.returncode, 0, extended.stderr[-3000:])
    self.assertIn('program_state_6 does not load', extended.stderr)
    self.assertIn('resumed after round 3', extended.stderr)
    self.assertEqual(_metrics(output_dir), _metrics(self._whole))


class StudyInterruptTest(absltest.TestCase):

  def test_sigterm_keeps_the_finished_runs_rows(self):
    output_dir = self.create_tempdir().full_path
    results = os.path.join(output_dir, 'results.csv')
    stderr_path = os.path.join(self.create_tempdir().full_path, 'stderr')
    with open(stderr_path, 'w') as stderr:
      study = subprocess.Popen(
          [sys.executable, '-m', 'experiments.sweep_epsilon',
           f'--output_dir={output_dir}', '--task=digits', '--num_clients=6',
           '--sampling=full', '--rounds=2', '--eval_every=2',
           '--noise_multipliers=0.5,1,2,4'],
          cwd=binaries.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
          start_new_session=True)
    stderr = _signal_group_once_written(
        study, results, signal.SIGTERM, stderr_path)
    self.assertEqual(study.returncode, 143, stderr[-3000:])
    self.assertNotIn('Traceback', stderr)
    last = stderr.strip().splitlines()[-1]
    self.assertRegex(last, r'^sweep_epsilon\.py: SIGTERM: stopped with \d of 5 '
                     'runs finished; their rows are in ')
    finished = int(last.split('stopped with ')[1].split()[0])
    self.assertBetween(finished, 1, 4)
    with open(results) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, finished)
    self.assertEqual(float(rows[0]['noise_multiplier']), 0.5)


class BinaryInterruptTest(absltest.TestCase):
  """A signal to the binaries that have no --resume: one line, exit 128 +
  the signal, and what was done kept."""

  def _signalled(self, binary, output_dir, written, signum, *args,
                 ready=lambda: True):
    """Runs the binary on digits, signals it once `written` exists and
    `ready()`; returns its last line of stderr."""
    stderr_path = os.path.join(self.create_tempdir().full_path, 'stderr')
    with open(stderr_path, 'w') as stderr:
      process = subprocess.Popen(
          [sys.executable, '-m', f'experiments.{binary}',
           f'--output_dir={output_dir}', '--task=digits', '--num_clients=6',
           '--sampling=full', '--rounds=400', '--eval_every=400', *args],
          cwd=binaries.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
          start_new_session=True)
    stderr = _signal_group_once_written(
        process, written, signum, stderr_path, ready)
    self.assertEqual(process.returncode, 128 + signum, stderr[-3000:])
    self.assertNotIn('Traceback', stderr)
    return stderr.strip().splitlines()[-1]

  def test_layer_norms_stops_after_the_round_and_writes_its_norms(self):
    output_dir = self.create_tempdir().full_path
    last = self._signalled(
        'layer_norms', output_dir,
        os.path.join(output_dir, 'run', 'metrics.csv'), signal.SIGINT)
    match = re.match(r'^layer_norms\.py: SIGINT: stopped with the norms of '
                     r'(\d+) of 400 rounds: ', last)
    self.assertIsNotNone(match, last)
    with open(os.path.join(output_dir, 'layer_norms.csv')) as f:
      rounds = {int(row['round']) for row in csv.DictReader(f)}
    self.assertEqual(rounds, set(range(1, int(match.group(1)) + 1)))
    self.assertTrue(os.path.getsize(os.path.join(output_dir, 'layer_norms.png')))

  def test_audit_stops_at_once_keeping_the_rounds_done(self):
    output_dir = self.create_tempdir().full_path
    metrics = os.path.join(output_dir, 'metrics.csv')
    last = self._signalled('audit', output_dir, metrics, signal.SIGTERM,
                           '--canaries=10', '--noise_multiplier=1.0',
                           ready=lambda: _metrics(output_dir))
    self.assertEqual(
        last, 'audit.py: SIGTERM: stopped before the run ended, so nothing '
        f'was audited; the rounds done are in {output_dir}')
    self.assertTrue(_metrics(output_dir))


if __name__ == '__main__':
  absltest.main()
