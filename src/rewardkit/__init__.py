"""rewardkit: human feedback on generated images -> reward models -> better generation."""

__version__ = "0.1.0"
