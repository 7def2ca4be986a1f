"""Bounded send-and-receive between the server and the sites.

Flower's ``Grid.send_and_receive`` waits without limit (or until one timeout for all) and
sleeps 3 s between polls, which every message pays; a site that never answers would leave
the study waiting, with nothing recorded against that site.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

POLL_SECONDS = 0.2


def _no_reply(msg: Message, reason: str) -> Message:
    """An error reply, from the site ``msg`` went to, for a reply that never came."""
    reply = Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


def exchange(
    grid: Grid, messages: Iterable[Message], *, timeout_s: float, poll_s: float = POLL_SECONDS
) -> list[Message]:
    """Send ``messages``; return one reply per message within ``timeout_s``.

    A site that does not answer in time gets an error reply in its name (so it is recorded as
    that site's failure), and its message expires then (TTL), so a slow site never works on a
    round the study has left. One whose SuperNode died is answered by the SuperLink once its
    heartbeat lapses, from the SuperLink's own id: that failure too is put under the site.
    """
    messages = list(messages)
    for msg in messages:
        msg.metadata.ttl = float(timeout_s)
    ids = list(grid.push_messages(messages))
    # The SuperLink gives "" (or no id at all) for a message it did not store.
    ids += [""] * (len(messages) - len(ids))
    sent = {i: m for i, m in zip(ids, messages, strict=True) if i}
    refused = "the SuperLink did not accept the message for this site"
    replies = [_no_reply(m, refused) for i, m in zip(ids, messages, strict=True) if not i]
    pending = set(sent)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        for reply in arrived:
            if reply.metadata.src_node_id == SUPERLINK_NODE_ID:
                original = sent.get(reply.metadata.reply_to_message_id)
                if original is not None:
                    reply.metadata.__dict__["_src_node_id"] = original.metadata.dst_node_id
        replies.extend(arrived)
        pending -= {m.metadata.reply_to_message_id for m in arrived}
        if pending:
            time.sleep(poll_s)
    for message_id in sorted(pending):
        reason = f"no reply within round-timeout ({timeout_s:.0f} s)"
        replies.append(_no_reply(sent[message_id], reason))
    return replies
