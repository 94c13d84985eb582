"""Consumer-group routes: POST /groups (register, JSON body {"name": ...}), GET /groups, DELETE /groups/NAME,
and the `group` query parameter of the data routes. The groups live in the buffer (actdata.shm.groups), so
every HTTP process answers the same; like every route but `GET /`, these need the API key when one is set."""
from __future__ import annotations

from fastapi import Path, Query
from pydantic import BaseModel, Field

from ..shm import BufferSpec, GroupRefused
from ..shm.groups import DEFAULT_GROUP, NAME_PATTERN, groups_off
from .answers import BAD_INPUT, Error, RouteContext, error

GROUP_REFUSED = {409: {"model": Error, "description": "No room for another consumer group, or this server has "
                                                      "none (buffer.max_groups=0)"}}
NOT_REGISTERED = {404: {"model": Error, "description": "No consumer group of that name is registered"}}
NAME_DOC = "1-64 characters of A-Z a-z 0-9 _ . -"


class GroupName(BaseModel):
    """The body of POST /groups."""

    name: str = Field(pattern=NAME_PATTERN, max_length=64, description=f"the group's name ({NAME_DOC})")


def group_query(spec: BufferSpec):
    """The data routes' `group` parameter."""
    what = (f"consumer group to read as ({NAME_DOC}): it receives every row once, whatever other groups read; "
            f"none = the group {DEFAULT_GROUP!r}") if spec.max_groups else \
        "consumer group (this server has none: start it with buffer.max_groups=N)"
    return Query(None, pattern=NAME_PATTERN, max_length=64, description=what)


OFF = {"groups": [], "group_policy": None, "max_groups": 0, "groups_expected": 0}


def add_group_routes(app, ctx: RouteContext) -> None:
    buffer = ctx.buffer

    @app.get("/groups", summary="Consumer groups: per group rows read, lag, rows/s, rows skipped, last seen, "
             "state; the lag policy, the maximum and the groups expected before serving")
    def list_groups():
        return OFF if buffer.groups is None else buffer.groups.describe()

    @app.post("/groups", summary="Register a consumer group (also done by its first read); registering one "
              "that exists is harmless", responses={**BAD_INPUT, **GROUP_REFUSED})
    def register_group(body: GroupName):
        try:
            if buffer.groups is None:
                raise groups_off(body.name)
            return buffer.groups.register(body.name)
        except GroupRefused as e:
            return error(e.status, str(e))

    @app.delete("/groups/{name}", summary="Drop a consumer group now: the rows it has not read are released",
                responses={**BAD_INPUT, **GROUP_REFUSED, **NOT_REGISTERED})
    def drop_group(name: str = Path(pattern=NAME_PATTERN, max_length=64, description=NAME_DOC)):
        try:
            if buffer.groups is None:
                raise groups_off(name)
            return {"dropped": buffer.groups.drop(name)}
        except GroupRefused as e:
            return error(e.status, str(e))
