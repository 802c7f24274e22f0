import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
