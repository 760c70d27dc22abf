"""One router per concern: health, models, predict, torchserve, docs (the audit routes are service/audit/routes.py)."""
