"""A member's death, announced by the pool to its routers (`MemberDown`).

When the pool's coordinator removes a server it stopped hearing from, it tells the
routers at once, so that they drop the dead server's membership of the group (and
any R4 paths pinned to it) instead of holding it until it times out. The notice is
flooded router to router, unchanged, like a join; its signature, made with the
pool's private key when the pool has one, covers every field but itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from manycast.wire.control.envelope import Envelope, MessageType, control_message
from manycast.wire.control.fields import (
    U64,
    Address,
    as_bytes,
    check_address,
    check_uint,
    read_address,
    set_field,
    write_address,
)
from manycast.wire.cursor import Reader, Writer
from manycast.wire.errors import WireError

SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 8
# Signed with the context first, so no other signed message of the pool reads as one.
SIGNED_CONTEXT = b"manycast member-down v1"


@control_message
@dataclass(frozen=True, slots=True)
class MemberDown(Envelope):
    """The pool declared `member` dead: its membership of `group` ends now. `signer`
    is the server that says so (the coordinator), `epoch` the allocation without the
    member, `wall_ms` when it was said (for the routers' timeliness check) and
    `nonce` a random value that makes each notice unique (their replay cache)."""

    TYPE: ClassVar[MessageType] = MessageType.MEMBER_DOWN
    group: Address
    member: Address
    signer: Address
    epoch: int
    wall_ms: int
    nonce: bytes
    signature: bytes = b""

    def _check(self, what: str) -> None:
        for name in ("group", "member", "signer"):
            check_address(what, name, getattr(self, name))
        check_uint(what, "epoch", self.epoch, U64)
        check_uint(what, "wall_ms", self.wall_ms, U64)
        nonce = as_bytes(what, "nonce", self.nonce)
        if len(nonce) != NONCE_BYTES:
            raise WireError(f"{what}: nonce of {len(nonce)} bytes, need {NONCE_BYTES}")
        signature = as_bytes(what, "signature", self.signature)
        if len(signature) not in (0, SIGNATURE_BYTES):
            raise WireError(
                f"{what}: signature of {len(signature)} bytes, need 0 or {SIGNATURE_BYTES}"
            )
        set_field(self, "nonce", nonce)
        set_field(self, "signature", signature)

    def signed_bytes(self) -> bytes:
        """What the signature covers: the body without the signature."""
        w = Writer().bytes(SIGNED_CONTEXT)
        self._write_fields(w)
        return w.getvalue()

    def _write_fields(self, w: Writer) -> None:
        for address in (self.group, self.member, self.signer):
            write_address(w, address)
        w.u64(self.epoch).u64(self.wall_ms).bytes(self.nonce)

    def _write_body(self, w: Writer) -> None:
        self._write_fields(w)
        w.u8(len(self.signature)).bytes(self.signature)

    @classmethod
    def _read_body(cls, sender: str, seq: int, r: Reader) -> MemberDown:
        group = read_address(r, "group")
        member = read_address(r, "member")
        signer = read_address(r, "signer")
        epoch = r.u64("epoch")
        wall_ms = r.u64("wall_ms")
        nonce = r.bytes(NONCE_BYTES, "nonce")
        signature = r.bytes(r.u8("signature length"), "signature")
        return cls(sender, seq, group, member, signer, epoch, wall_ms, nonce, signature)
