"""Hugging Face `hrm_text` checkpoints in and out (`export.py` writes, `convert.py` reads and converts
directories), and hrmspec's own checkpoint format (`convert.py`)."""
