"""Apple's pfl-research (PyTorch backend, CPU) on the peers' workload.

`FederatedAveraging` with a `SimulatedBackend` whose postprocessor is pfl's
central Gaussian mechanism (clip 1, relative noise stddev 1); 50 users per
round sampled at random from the population, one local epoch of batch 16
(4 SGD steps), no evaluation. Each round is timed from the moment the driver
asks for it to pfl's `after_central_iteration` callback.
"""

import time

import numpy as np
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism
import torch

import common


class _Mlp(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(common.FEATURES, common.HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(common.HIDDEN, common.CLASSES))

  def forward(self, x):
    return self.layers(x)

  def loss(self, x, y, eval=False):  # pylint: disable=redefined-builtin
    self.eval() if eval else self.train()
    return torch.nn.functional.cross_entropy(self(x), y)

  def metrics(self, x, y, eval=False):  # pylint: disable=redefined-builtin
    loss = self.loss(x, y, eval).item() * len(y)
    return {'loss': Weighted(loss, len(y))}


class _RoundClock(TrainingProcessCallback):
  """Reports each round's seconds and waits for the driver's next request."""

  def __init__(self):
    self._start = None

  def after_central_iteration(self, aggregate_metrics, model, *,
                              central_iteration):
    if self._start is None:  # the warm-up round
      common.say('ready')
    else:
      common.say(f'{time.perf_counter() - self._start:.6f}')
    go_on = common.wait_for_round()
    self._start = time.perf_counter()
    return not go_on, Metrics()


def main():
  torch.manual_seed(0)
  np.random.seed(0)
  users = {user: [torch.from_numpy(a) for a in common.user_data(user)]
           for user in range(common.POPULATION)}
  data = FederatedDataset.from_slices(
      users, get_user_sampler('random', list(users)))
  module = _Mlp()
  model = PyTorchModel(
      module, local_optimizer_create=torch.optim.SGD,
      central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
  backend = SimulatedBackend(
      training_data=data, val_data=data,
      postprocessors=[CentrallyAppliedPrivacyMechanism(GaussianMechanism(
          common.CLIP, common.NOISE_MULTIPLIER))])
  FederatedAveraging().run(
      algorithm_params=NNAlgorithmParams(
          central_num_iterations=10**6, evaluation_frequency=10**6,
          train_cohort_size=common.USERS_PER_ROUND, val_cohort_size=0),
      backend=backend, model=model,
      model_train_params=NNTrainHyperParams(
          local_learning_rate=common.LEARNING_RATE, local_num_epochs=1,
          local_batch_size=common.BATCH),
      callbacks=[_RoundClock()])


if __name__ == '__main__':
  main()
