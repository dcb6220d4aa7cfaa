"""lm-evaluation-harness task definitions shipped with qstar_mini (``qstar_gsm8k_format``: the
project's GSM8K-format file, offline); ``qstar_mini.evaluation.harness`` adds this folder to lm_eval's tasks."""
