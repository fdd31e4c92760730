"""Stand-in for the get-pip.py that ansible-test downloads from ci-files.testing.ansible.com, a host a
machine with only the package registries cannot reach: Python's own ensurepip, then pip installs what
ansible-test asked for (the pinned pip, from the package index). tests/ansible/test_sanity.py puts it in
ansible-test's cache under the name it looks for."""

import subprocess
import sys

# In a process of its own: ensurepip sets PIP_CONFIG_FILE=/dev/null in the process it runs in, and the
# install below needs the machine's pip config (its index and CA bundle).
subprocess.check_call([sys.executable, "-m", "ensurepip"])
wanted = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", *wanted])
