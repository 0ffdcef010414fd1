"""Byte layout of the symmetric buffer's signal area, shared by the kernels and the host.

Each rank's symmetric buffer = [data region | signal area of SIG_BYTES]. The signal area lives in
our own buffer rather than in torch's signal pads: their size differs between torch versions and
torch's own symm-mem ops use them with a different (CAS-reset) protocol.

u32 words, byte offsets from the start of the signal area:
  slots[b][src]  at (b * MAX_RANKS + src) * 4   barriers CTA b of rank `src` signalled to us
  epoch[b]       at EPOCH_OFF + b * 4           barriers our CTA b has passed
  err            at ERR_OFF                     first timeout's code (0 = none); sticky
"""
MAX_RANKS = 8        # one NVLink domain
MAX_CTAS = 128       # grid limit of the communication kernels
EPOCH_OFF = MAX_CTAS * MAX_RANKS * 4
ERR_OFF = EPOCH_OFF + MAX_CTAS * 4
SIG_BYTES = 8192     # >= ERR_OFF + 4, a multiple of 128

# err code: bit 31 set | barrier k (1 = start, 2 = end) << 16 | CTA (mod 256) << 8 | rank waited for
BARRIER_NAMES = {1: "start", 2: "end"}


def decode_error(code: int) -> tuple[int, int, int]:
    """(rank waited for, barrier number, CTA) of an error word."""
    return code & 0xFF, (code >> 16) & 0xFF, (code >> 8) & 0xFF


assert ERR_OFF + 4 <= SIG_BYTES and SIG_BYTES % 128 == 0
