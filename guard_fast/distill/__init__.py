"""Distillation stages, one module per stage: SRe2L's recover (CDA as its option) and relabel."""
