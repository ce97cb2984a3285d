"""Other tools' formats: Hugging Face `hrm_text` checkpoints in and out (`export.py` writes, `convert.py`
reads and converts directories), Huginn, official HRM / TRM checkpoints and their ACT interface
(`hrm_act.py`), and hrmspec's own checkpoint format (`convert.py`)."""
