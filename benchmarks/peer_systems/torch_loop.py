"""A framework-free PyTorch DP-FedAvg round (the issue's reference peer).

Every sampled user trains a copy of the global MLP for 4 SGD steps, its delta
is clipped to norm 1 and summed; Gaussian noise of stddev 1 is added to the
sum, which is averaged over the 50 users and applied. CPU, user by user.
"""

import time

import numpy as np
import torch

import common


def main():
  torch.manual_seed(0)
  model = torch.nn.Sequential(
      torch.nn.Linear(common.FEATURES, common.HIDDEN), torch.nn.ReLU(),
      torch.nn.Linear(common.HIDDEN, common.CLASSES))
  local = torch.nn.Sequential(
      torch.nn.Linear(common.FEATURES, common.HIDDEN), torch.nn.ReLU(),
      torch.nn.Linear(common.HIDDEN, common.CLASSES))
  data = {}
  rng = np.random.default_rng(0)
  loss_fn = torch.nn.CrossEntropyLoss()

  def one_round():
    cohort = rng.choice(common.POPULATION, common.USERS_PER_ROUND, replace=False)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for user in cohort:
      if user not in data:
        data[user] = tuple(map(torch.from_numpy, common.user_data(int(user))))
      x, y = data[user]
      local.load_state_dict(model.state_dict())
      optimizer = torch.optim.SGD(local.parameters(), lr=common.LEARNING_RATE)
      for step in range(common.STEPS):
        batch = slice(step * common.BATCH, (step + 1) * common.BATCH)
        optimizer.zero_grad()
        loss_fn(local(x[batch]), y[batch]).backward()
        optimizer.step()
      with torch.no_grad():
        delta = [l - g for l, g in zip(local.parameters(), model.parameters())]
        norm = torch.sqrt(sum(torch.sum(d * d) for d in delta))
        scale = min(1.0, common.CLIP / (float(norm) + 1e-12))
        for t, d in zip(total, delta):
          t.add_(d, alpha=scale)
    with torch.no_grad():
      for p, t in zip(model.parameters(), total):
        noise = torch.randn_like(t) * (common.NOISE_MULTIPLIER * common.CLIP)
        p.add_((t + noise) / common.USERS_PER_ROUND)

  one_round()
  common.say('ready')
  while common.wait_for_round():
    start = time.perf_counter()
    one_round()
    common.say(f'{time.perf_counter() - start:.6f}')


if __name__ == '__main__':
  main()
