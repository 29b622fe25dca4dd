"""Integer helpers for host code, shared by the launchers (ops/) and the configuration tables (configs/)."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. triton.cdiv is a constexpr function in triton 3.8 and costs ~3 µs per host call
    (measured on a 2-core CPU), about 60 calls per model step."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host code (triton.next_power_of_2 costs as much as cdiv)."""
    return 1 << (n - 1).bit_length()
