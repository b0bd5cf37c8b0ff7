"""Student training on a distilled set: knowledge distillation from the teacher's soft labels (FKD)."""
