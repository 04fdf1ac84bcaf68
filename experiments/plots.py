"""PNG figures of the studies (matplotlib, no display needed)."""

from typing import Optional

import matplotlib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top


def accuracy_vs_epsilon(
    series: dict[str, list[tuple[float, float]]],
    path: str,
    title: str,
    delta: float,
    baseline: Optional[float] = None,
    ylabel: str = 'test accuracy',
) -> None:
  """Final accuracy (or what `ylabel` names) against epsilon (log scale), one
  line per series.

  Args:
    series: label -> [(epsilon, accuracy)], any order.
    path: where the PNG goes.
    title: the figure's title.
    delta: the delta every epsilon is stated at.
    baseline: accuracy without DP, drawn as a dashed line.
    ylabel: the y axis's label.
  """
  figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
  for label, points in series.items():
    points = sorted(points)
    axes.plot([e for e, _ in points], [a for _, a in points], 'o-', label=label)
  if baseline is not None:
    axes.axhline(baseline, color='grey', linestyle='--', label='no DP')
  axes.set_xscale('log')
  axes.set_xlabel(f'epsilon at delta={delta:g}')
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(True, which='both', alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def layer_norm_boxes(
    norms_by_layer: dict[str, list[float]], path: str, title: str
) -> None:
  """One box per layer of the per-client update norms seen over all rounds."""
  figure, axes = plt.subplots(
      figsize=(max(6, 0.6 * len(norms_by_layer)), 4), dpi=100
  )
  axes.boxplot(list(norms_by_layer.values()), showfliers=True)
  axes.set_xticks(range(1, len(norms_by_layer) + 1))
  axes.set_xticklabels(list(norms_by_layer), rotation=45, ha='right')
  axes.set_yscale('log')
  axes.set_ylabel('L2 norm of the client update')
  axes.set_title(title)
  axes.grid(True, axis='y', which='both', alpha=0.3)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def accuracy_vs_fraction(
    series: dict[str, list[tuple[float, float]]], path: str, title: str,
    ylabel: str = 'test accuracy',
    xlabel: str = 'fraction of Byzantine clients',
) -> None:
  """Final accuracy (or what `ylabel` names) against a fraction of the
  clients (`xlabel`: Byzantine, dropped out), one line per series
  (label -> [(fraction, accuracy)])."""
  figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
  for label, points in sorted(series.items()):
    points = sorted(points)
    axes.plot([f for f, _ in points], [a for _, a in points], 'o-', label=label)
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  if ylabel == 'test accuracy':
    axes.set_ylim(0, 1)
  axes.set_title(title)
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize='small', loc='lower left')
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)


def canary_histograms(
    statistics: dict[str, tuple[list[float], list[float]]],
    path: str,
    title: str,
) -> None:
  """Histograms of inserted against held-out canaries' statistics, one panel
  per statistic ({name: (inserted, held out)})."""
  figure, axes = plt.subplots(
      1, len(statistics), figsize=(5 * len(statistics), 3.6), dpi=100,
      squeeze=False)
  for axis, (name, (inserted, held_out)) in zip(axes[0], statistics.items()):
    values = list(inserted) + list(held_out)
    bins = 30 if len(set(values)) > 1 else 1
    span = (min(values), max(values)) if values else (0.0, 1.0)
    axis.hist(held_out, bins=bins, range=span, alpha=0.6,
              label=f'held out ({len(held_out)})')
    axis.hist(inserted, bins=bins, range=span, alpha=0.6,
              label=f'inserted ({len(inserted)})')
    axis.set_xlabel(name)
    axis.set_ylabel('canaries')
    axis.legend()
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path)
  plt.close(figure)
