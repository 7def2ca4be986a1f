"""A fake Flower Grid for server-side tests: messages are answered at once by ``_reply``."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message


class FakeGrid:
    """``get_node_ids`` / ``push_messages`` / ``pull_messages`` over ``nodes`` (id -> site
    name); a subclass answers each message in ``_reply``. Every reply is kept in
    ``all_replies``."""

    def __init__(self, nodes: dict[int, str]) -> None:
        self.nodes = nodes
        self.replies: list[Message] = []
        self.all_replies: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink assigns
            self.replies.append(self._reply(msg))
        self.all_replies += self.replies
        return [r.metadata.reply_to_message_id for r in self.replies]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        return [r for r in self.replies if r.metadata.reply_to_message_id in wanted]

    def _reply(self, msg: Message) -> Message:
        raise NotImplementedError
