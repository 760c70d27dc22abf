"""One router per concern: health, models, predict, audit, torchserve."""
