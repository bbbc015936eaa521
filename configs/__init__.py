"""Training configs (`get_config(arg)` each); train.py loads them by path."""
