"""The recall study: associative recall among distractors (`config.py`: its settings, `task.py`: the task)."""
