"""Evaluation: multiple-choice scoring (choice.py) and lm-evaluation-harness tasks (lm_eval_tasks/)."""
