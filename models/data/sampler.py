"""P x K sampling: batches of P patients with K images each, so every batch holds genuine pairs for
the metric-learning losses; balanced across sets and split across DDP ranks on request.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np


class PKSampler:
    """Batches of P patients x K images, so every batch holds genuine pairs.

    Patients with fewer than K images are drawn with replacement (a one-image patient gives K
    views of one image: an instance-discrimination positive, and a class/negative for the rest).
    Each epoch visits every patient once, or, with ``batches_per_epoch``, draws that many batches
    from cycled permutations of the patients (so epochs of sets of different sizes have the same
    length and one schedule fits them all). With ``world_size > 1`` (torchrun DDP) every rank
    draws the same epoch plan from the shared seed and keeps every ``world_size``-th batch.

    ``groups`` (one per image, e.g. its data set) balances the groups instead: an epoch keeps its
    length (one draw per patient) but gives every group an equal share of the draws, cycling
    through a small group's patients several times and through a large one's only partly (so a
    small group's patient can fall twice into one batch: more positives, no harm). Without it a set
    with most of the patients fills most of the batches.
    """

    def __init__(
        self,
        labels: Sequence[int],
        patients_per_batch: int,
        images_per_patient: int,
        *,
        groups: Sequence[str] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 0,
    ) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            self.by_label[int(label)].append(index)
        self.labels = sorted(self.by_label)
        self.labels_by_group: dict[str, list[int]] = {}
        if groups is not None:
            if len(groups) != len(labels):
                raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
            group_of = {int(label): str(group) for label, group in zip(labels, groups, strict=True)}
            for label in self.labels:
                self.labels_by_group.setdefault(group_of[label], []).append(label)
        self.p, self.k = patients_per_batch, images_per_patient
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def _epoch_order(self, rng: np.random.Generator, draws: int) -> np.ndarray:
        """``draws`` patients in order: cycled permutations, or equal shares per group."""
        if len(self.labels_by_group) < 2:
            return _cycled_permutations(self.labels, draws, rng)
        share = -(-draws // len(self.labels_by_group))
        chosen = [
            _cycled_permutations(self.labels_by_group[group], share, rng)
            for group in sorted(self.labels_by_group)
        ]
        return rng.permutation(np.concatenate(chosen))[:draws]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per rank: ``batches_per_epoch`` when set, else one draw per patient."""
        if self.batches_per_epoch > 0:
            return max(1, self.batches_per_epoch // self.world_size)
        return len(self.labels) // self.p // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        n_batches = len(self)
        order = self._epoch_order(rng, n_batches * self.world_size * self.p)
        for batch_index in range(n_batches):
            global_index = batch_index * self.world_size + self.rank
            chosen = order[global_index * self.p : (global_index + 1) * self.p]
            batch: list[int] = []
            for label in chosen:
                pool = self.by_label[int(label)]
                replace = len(pool) < self.k
                batch.extend(int(i) for i in rng.choice(pool, size=self.k, replace=replace))
            yield batch


def _cycled_permutations(members: Sequence[int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws from ``members``: whole permutations, the last one cut short."""
    cycles = max(1, -(-count // max(1, len(members))))
    return np.concatenate([rng.permutation(members) for _ in range(cycles)])[:count]
