"""pyproject.toml's lower bounds and the pins `make test-compat` installs agree (framework-free)."""

import check_bounds


def test_constraints_pin_exactly_the_declared_lower_bounds():
    assert check_bounds.problems() == []
