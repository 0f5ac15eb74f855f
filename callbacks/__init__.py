"""Lightning callbacks that watch leakage while training (thin: scheduling and logging; math in pl_i2f)."""

from callbacks.audit import AttackAudit
from callbacks.autopilot import LeakageAutopilot
from callbacks.leakage import I2FMonitor
from callbacks.preemption import PreemptionCheckpoint
from callbacks.tradeoff import TradeoffTracker

__all__ = ["AttackAudit", "I2FMonitor", "LeakageAutopilot", "PreemptionCheckpoint", "TradeoffTracker"]
