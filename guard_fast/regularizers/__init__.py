"""Training objectives on real data: plain CE, the GUARD regularizers and the adversarial-training baselines, one
implementation each, shared by every stage that trains a network on real data (the squeeze teacher, the MTT/TESLA
experts). Below the stages: no stage imports another, so what two stages share lives here."""
