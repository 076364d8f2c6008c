"""Built-in fedmedbench components."""
