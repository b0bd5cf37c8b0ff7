"""Attacks: light-weight PGD/FGSM/TRADES for adversarial training and quick validation (`pgd`, `accuracy`), and the
evaluation suite on torchattacks with the paper's settings (`suite`)."""
