"""Station-side deployment: install / roll back model bundles, systemd units, fleet rollout.

Imports ``runtime`` (bundle verification) and never ``training`` or ``calibration``;
the TensorRT engine build is run as a ``defectscope build-engine`` subprocess.
Ansible roles (``deploy/ansible``), Prometheus rules and the Grafana dashboard
(``deploy/monitoring``) and the systemd units (``deploy/systemd``) ship as package data.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
UNITS_DIR = PACKAGE_DIR / "systemd"
ANSIBLE_DIR = PACKAGE_DIR / "ansible"
MONITORING_DIR = PACKAGE_DIR / "monitoring"
