"""The test suite's own machinery: `make test` groups each module's tests on one xdist worker."""


def test_loadgroup_puts_this_module_in_its_own_group(request):
    # conftest marks every test with its module's xdist_group; xdist appends the group to the node
    # id, and only then are session fixtures (a built zoo, trained tiny runs) made once per group.
    # pytest 9 broke that suffix under xdist 3.8 (every session fixture was built on both workers).
    if not getattr(request.config.option, "loadgroup", False):  # set on xdist workers
        return  # grouping only exists under `make test`'s --dist loadgroup
    assert request.node.nodeid.endswith("@test_suite"), request.node.nodeid
