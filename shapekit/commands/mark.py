"""shape-mark: the [[mark]] rules into shapekit's mangle chains, and the direction = "in" rules
into the ingress trees' u32 filters.
"""

from __future__ import annotations

from functools import partial

from shapekit.commands import common
from shapekit.kernel import run
from shapekit.plan import ingress as plan_ingress
from shapekit.plan import mangle as plan_mangle
from shapekit.plan.mangle import FAMILIES, MARK
from shapekit.state import RuntimeBypass, state_dir


def mark(options: common.Options) -> None:
    """shape-mark: the [[mark]] rules into shapekit's mangle chains."""
    config = options.load()
    common.check_mangle(options, "shape-mark", config)
    runner = options.runner()
    with options.lock():
        bypass = common.merged_bypass(config, RuntimeBypass.load(state_dir()))
        plans = {f: plan_mangle.mark_plan(config, bypass, f) for f in FAMILIES}
        inbound = common.ingress_filters(config, partial(plan_ingress.rule_filters, rules=config.marks))
        common.probe_mangle(plans, MARK)
        with run.transaction(runner) as journal:
            common.install_mangle(runner, plans, MARK, journal)
            common.refresh_ingress(runner, journal, 'direction = "in" rule', plan_ingress.RULE_PREF, inbound)


mark_app = common.new_app()


@mark_app.command()
def shape_mark(
    config: common.ConfigOption = None,
    dry_run: common.DryRunOption = False,
    verbose: common.VerboseOption = False,
    version: common.VersionOption = False,
) -> None:
    """Install the [[mark]] rules in shapekit's own mangle chains, in iptables and ip6tables.

    Rules run in file order and the first match wins; a rule's mark is saved to
    its connection, so every packet of a connection lands in the same class,
    except a per-packet rule's (tcp_flags, dscp, length): the rules up to the
    last per-packet one are tried on every packet, before a connection's saved
    mark. A rule with IPv4 addresses goes only to iptables,
    one with IPv6 addresses only to ip6tables. The chains are reached by one
    jump from mangle POSTROUTING; each family's change is one transaction.

    Exit status: 0 done; 2 bad input (config, a match this machine lacks,
    not root), nothing changed; 1 a system command failed (nothing left half-applied).
    """

    common.reported("shape-mark", lambda: mark(common.make_options(config, dry_run, verbose)))


def mark_main() -> None:
    common.console(mark_app, "shape-mark")
