"""CKKS parameter validation: 128-bit security, precision, headroom."""

from __future__ import annotations

import pytest

from he_layers import CKKSParams, KeyOwner, LayerSpec
from syft_split.errors import ConfigError, HEError, InsecureParametersError

pytestmark = pytest.mark.he


def test_default_params_are_valid() -> None:
    p = CKKSParams().validate()
    assert p.slots == 4096 and p.headroom_bits == 20 and p.total_coeff_bits == 160


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"poly_modulus_degree": 4096}, "expected total <= 109 bits, got 160"),
        ({"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": (30, 25, 30)}, "<= 54"),
        ({"poly_modulus_degree": 5000}, "must be one of"),
        ({"coeff_mod_bit_sizes": (60, 60)}, "at least 3 primes"),
        ({"coeff_mod_bit_sizes": (60, 40, 61)}, "20..60 bits"),
        ({"global_scale_bits": 21, "coeff_mod_bit_sizes": (40, 21, 40)}, "expected >= 25, got 21"),
        ({"global_scale_bits": 45}, "expected scale bits <= 40, got 45"),
        ({"coeff_mod_bit_sizes": (45, 40, 60)}, "headroom"),
    ],
)
def test_insecure_or_imprecise_params_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(InsecureParametersError, match=needle):
        CKKSParams(**kwargs).validate()


def test_insecure_params_error_is_in_the_hierarchy() -> None:
    assert issubclass(InsecureParametersError, HEError)
    assert issubclass(InsecureParametersError, ConfigError)


def test_key_owner_refuses_insecure_params() -> None:
    with pytest.raises(InsecureParametersError):
        KeyOwner(LayerSpec(4, 4, 2), CKKSParams(poly_modulus_degree=4096))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"level": "C"}, "level"),
        ({"level": "B"}, "lr"),
        ({"mask_bits": 19}, "mask_bits"),
        ({"flood_bits": 39}, "flood_bits"),
    ],
)
def test_bad_layer_spec_is_refused(kwargs: dict, needle: str) -> None:
    base = {"batch_size": 4, "d_in": 4, "d_out": 2}
    with pytest.raises(ConfigError, match=needle):
        LayerSpec(**{**base, **kwargs}).validate(CKKSParams())


@pytest.mark.parametrize("bad", [
    {"poly_modulus_degree": 8192.0},
    {"poly_modulus_degree": True},
    {"poly_modulus_degree": "8192"},
    {"coeff_mod_bit_sizes": (60.0, 40, 60)},
    {"coeff_mod_bit_sizes": "60,40,60"},
    {"global_scale_bits": 40.0},
])
def test_parameters_are_type_checked(bad) -> None:  # type: ignore[no-untyped-def]
    """A float or string that equals a valid value is refused up front, not inside TenSEAL."""
    with pytest.raises(InsecureParametersError):
        CKKSParams(**bad).validate()
