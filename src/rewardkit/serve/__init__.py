"""``rewardkit serve``: scoring, inspection and generation over HTTP, and the review page.

- :mod:`rewardkit.serve.apis`: the /v1 endpoints as LitServe APIs (dynamic batching,
  worker processes per device), each calling the batch command's own functions;
- :mod:`rewardkit.serve.app`: the server: /health, body limits, multipart, /docs;
- :mod:`rewardkit.serve.review`: the review page and its API;
- :mod:`rewardkit.serve.labels`: the label database (SQLAlchemy), agreement, and
  ``rewardkit labels export``.
"""

from rewardkit.serve.config import ServeConfig

__all__ = ["ServeConfig"]
