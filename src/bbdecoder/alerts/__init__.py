"""Alerts: training anomalies detected as steps are recorded, stored as events, warned once per kind.

    from bbdecoder.alerts import AlertEngine
    analyzer = Analyzer(model, "runs/x")
    AlertEngine().attach(analyzer.writer)     # every recorded row is now checked

See :mod:`bbdecoder.alerts.rules` for the rules, their thresholds and why each exists.
"""

from bbdecoder.alerts.engine import Alert, AlertEngine, AlertWarning, evaluate_run
from bbdecoder.alerts.rules import ALERT_KINDS, AlertConfig

__all__ = ["ALERT_KINDS", "Alert", "AlertConfig", "AlertEngine", "AlertWarning", "evaluate_run"]
