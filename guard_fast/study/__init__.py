"""The paper's experiments at CPU scale: every table cell over several seeds, cached, with paired statistics."""
