"""Macula's inference service: ``python -m service`` or ``service.app.create_app(settings)``.

What the model does (codec.py: bytes → input, masks → PNG; inference.py: device, AMP, forward, masks) is kept
apart from how requests are scheduled (batching.py: queues, batch collection, deadlines, one inference thread).
app.py builds the FastAPI app and its lifespan; state.py holds the running service (no FastAPI in it); deps.py
is what routes take from a request; routers/ has one router per concern. Nothing is imported here, so
``import service.metrics`` stays light.
"""
