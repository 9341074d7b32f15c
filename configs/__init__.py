"""Every setting of the service, read from ``ASR_*`` environment variables (or a ``.env`` file).

``python -m configs`` prints them as the Markdown table in the README.
"""

from configs.settings import Settings

__all__ = ["Settings"]
