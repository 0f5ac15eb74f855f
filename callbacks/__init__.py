"""Lightning callbacks that watch leakage while training (thin: scheduling and logging; math in pl_i2f)."""

from .audit import AttackAudit
from .autopilot import LeakageAutopilot
from .leakage import I2FMonitor
from .preemption import PreemptionCheckpoint
from .tradeoff import TradeoffTracker

__all__ = ["AttackAudit", "I2FMonitor", "LeakageAutopilot", "PreemptionCheckpoint", "TradeoffTracker"]
