"""Periodic validation during training: clean accuracy and a quick PGD robust accuracy, sharded over ranks."""

from __future__ import annotations

import torch

from guard_fast.attacks.pgd import pgd
from guard_fast.runtime import distributed as D


def accuracy(model: torch.nn.Module, loader, eps: list[float] = (), pgd_steps: int = 10, max_batches: int = 0,
             dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """{'clean': acc, 'pgd@<eps>': acc, ...} over this rank's shard, counts summed over ranks (one sync at the end).

    Robust accuracy uses PGD with `pgd_steps` steps of eps/4 from a random start (seeded per batch), counting a
    sample as robust only if it is also classified correctly when clean. The model is left in its previous mode.
    """
    was_training = model.training
    model.eval()
    keys = ["clean", *[f"pgd@{e:.6g}" for e in eps]]
    counts = torch.zeros(len(keys) + 1, dtype=torch.float64, device=next(model.parameters()).device)
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x = x.to(dtype)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        counts[0] += correct.sum()
        for k, e in enumerate(eps, start=1):
            gen = torch.Generator(device=x.device).manual_seed(1000 * i + k)
            adv = pgd(model, x, y, e, e / 4, pgd_steps, random_start=True, generator=gen)
            with torch.no_grad():
                counts[k] += (correct & (model(adv).argmax(1) == y)).sum()
        counts[-1] += len(y)
    D.all_reduce_sum(counts)
    model.train(was_training)
    values = (counts[:-1] / counts[-1].clamp(min=1)).tolist()  # host sync: once per validation
    return dict(zip(keys, values, strict=True))
