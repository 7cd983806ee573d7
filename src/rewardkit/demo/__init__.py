"""``rewardkit demo``: the whole loop on the embedded default, one module per stage.

``run.py`` runs the stages in order and writes ``report.html``; ``rfnet.py``, ``reward.py``,
``generation.py`` and ``rfft.py`` are the inspector, Social Reward, Recurrent Generation and
fine-tuning stages. Every stage evaluates on products and prompts that none of the shipped
models trained or was chosen on, checked by their keys (``rewardkit.data.keys``).
"""

from rewardkit.demo.run import run_demo

__all__ = ["run_demo"]
