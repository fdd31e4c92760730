"""The undo journal: what is recorded when, what is put back in which order, and what the one line says."""

from __future__ import annotations

import pytest

from shapekit.errors import CommandFailed, UsageError
from shapekit.kernel import netlink as tc_netlink
from shapekit.kernel.run import Journal, Runner, in_order, transaction


def failing(command: str):
    def run():
        raise CommandFailed(command, "boom")

    return run


def test_steps_are_put_back_newest_first_and_named():
    done = []
    with pytest.raises(CommandFailed) as failed, transaction(Runner()) as journal:
        journal.change("a", lambda: done.append("a"), lambda: done.append("undo a"))
        journal.change("b", lambda: done.append("b"), lambda: done.append("undo b"), atomic=True)
        journal.change("c", failing("tc -batch -"), lambda: done.append("undo c"))

    assert done == ["a", "b", "undo c", "undo b", "undo a"]  # c failed part-way: put back too
    assert str(failed.value) == "`tc -batch -` failed: boom; put back as before: a, b, c"


def test_an_atomic_step_that_fails_is_not_put_back():
    done = []
    with pytest.raises(CommandFailed) as failed, transaction(Runner()) as journal:
        journal.change("a", lambda: None, lambda: done.append("undo a"))
        journal.change("rules", failing("iptables-restore"), lambda: done.append("undo rules"), atomic=True)

    assert done == ["undo a"]
    assert str(failed.value).endswith("; put back as before: a")


def test_a_failing_put_back_says_what_is_left_changed():
    with pytest.raises(CommandFailed) as failed, transaction(Runner()) as journal:
        journal.change("a", lambda: None, lambda: None)
        journal.change("b", lambda: None, failing("ipset restore"))
        journal.change("c", failing("tc -batch -"), lambda: None)

    assert str(failed.value) == (
        "`tc -batch -` failed: boom; putting back b failed too: `ipset restore` failed: boom; left changed: b, a"
    )


def test_a_failure_before_any_change_says_nothing_was_changed():
    with pytest.raises(CommandFailed) as failed, transaction(Runner()) as journal:
        journal.change("a", failing("tc -batch -"), lambda: None, atomic=True)

    assert str(failed.value) == "`tc -batch -` failed: boom; nothing was changed"


def test_a_late_bad_input_or_ctrl_c_is_put_back_first():
    done = []
    with pytest.raises(UsageError) as refused, transaction(Runner()) as journal:
        journal.change("a", lambda: None, lambda: done.append("undo a"))
        raise UsageError("too many filters")
    assert str(refused.value) == "too many filters; put back as before: a"
    assert refused.value.exit_code == 2

    with pytest.raises(KeyboardInterrupt), transaction(Runner()) as journal:
        journal.change("b", lambda: None, lambda: done.append("undo b"))
        raise KeyboardInterrupt
    assert done == ["undo a", "undo b"]


def test_a_dry_run_records_nothing():
    journal = Journal(dry_run=True)
    journal.change("a", lambda: None, lambda: None)
    assert journal.steps == [] and journal.roll_back() == "nothing was changed"


def test_in_order_runs_each_step_in_turn():
    done = []
    in_order(lambda: done.append(1), lambda: done.append(2))()
    assert done == [1, 2]


def test_a_class_get_asks_for_one_handle_with_echo_and_ack():
    request = tc_netlink.get_request(7, 0x5C8003)
    length, kind, flags, _, _ = tc_netlink._NLMSGHDR.unpack_from(request)
    _, ifindex, handle, parent, _ = tc_netlink._TCMSG.unpack_from(request, tc_netlink._NLMSGHDR.size)
    assert (length, kind, ifindex, handle, parent) == (len(request), tc_netlink.RTM_GETTCLASS, 7, 0x5C8003, 0)
    assert flags == tc_netlink.NLM_F_REQUEST | tc_netlink.NLM_F_ECHO | tc_netlink.NLM_F_ACK  # no dump


def test_an_acknowledgement_ends_a_get_and_an_error_is_raised():
    ack = tc_netlink._NLMSGHDR.pack(36, tc_netlink.NLMSG_ERROR, 0, 1, 0) + bytes(20)
    assert tc_netlink.parse_messages(ack) == ([], True)
    missing = (
        tc_netlink._NLMSGHDR.pack(36, tc_netlink.NLMSG_ERROR, 0, 1, 0)
        + (-2).to_bytes(4, "little", signed=True)
        + bytes(16)
    )
    with pytest.raises(OSError) as raised:
        tc_netlink.parse_messages(missing)
    assert raised.value.errno == 2


def test_a_signal_during_a_step_stops_the_run_after_it_and_puts_it_back():
    import os
    import signal

    from shapekit.errors import Interrupted

    done = []
    with pytest.raises(Interrupted) as stopped, transaction(Runner()) as journal:
        journal.change("a", lambda: done.append("a"), lambda: done.append("undo a"))
        journal.change("b", lambda: os.kill(os.getpid(), signal.SIGTERM), lambda: done.append("undo b"))
        journal.change("c", lambda: done.append("c"), lambda: done.append("undo c"))

    assert done == ["a", "undo b", "undo a"]  # b ran whole (the signal waited for it); c never started
    assert str(stopped.value) == "interrupted by SIGTERM; put back as before: a, b"
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the run's only


def test_a_long_tc_batch_runs_in_parts_and_a_failure_names_its_line_among_all(mocker):
    """tc keeps about 4 KB a batch line until it exits: 100,000 lines in one tc took 400 MB."""
    mocker.patch("shapekit.kernel.run.TC_BATCH_LINES", 2)
    run_command = mocker.patch("shapekit.kernel.run.run_command", return_value="")
    cmds = [("tc", "class", "add", "dev", "eth0", "classid", f"1:{n}") for n in range(1, 6)]

    Runner().tc_batch("caps", cmds)

    assert run_command.call_args_list == [
        mocker.call(("tc", "-batch", "-"), "class add dev eth0 classid 1:1\nclass add dev eth0 classid 1:2\n"),
        mocker.call(("tc", "-batch", "-"), "class add dev eth0 classid 1:3\nclass add dev eth0 classid 1:4\n"),
        mocker.call(("tc", "-batch", "-"), "class add dev eth0 classid 1:5\n"),
    ]

    run_command.reset_mock()
    run_command.side_effect = ["", CommandFailed("tc -batch -", "RTNETLINK answers: File exists\nCommand failed -:2\n")]
    with pytest.raises(CommandFailed) as failed:
        Runner().tc_batch("caps", cmds)
    assert failed.value.stderr == "RTNETLINK answers: File exists\nCommand failed -:4\n"  # 1:4, the 4th of all
    assert run_command.call_count == 2  # the parts after a failed one never run, as tc stops a batch there
