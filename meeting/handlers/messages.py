"""The messages REST API: send, inbox, sent, unread, read marks."""

from aiohttp import web

from ..schemas import (
    CountSchema, LimitQuery, MarkReadResultSchema, MarkReadSchema, MessageSchema, PageQuery,
    ReadOneSchema, ReceivedMessageSchema, ReceivedPageSchema, ReceivedQuery, SendMessageSchema, SentPageSchema, UnreadSchema,
)
from ..typedefs import message_service_key, user_id_key
from .common import doc, parse_body, parse_query, path_id, respond


@doc("Send a message to 1-1000 users", body=SendMessageSchema, response=(201, MessageSchema), errors=(403,), tag="messages")
async def send(request: web.Request) -> web.Response:
    body = await parse_body(request, SendMessageSchema())
    message = await request.app[message_service_key].send_message(request[user_id_key], **body)
    return respond(MessageSchema(), message, status=201)


@doc("Messages received: newest first, or with after_seq oldest first by seq", query=ReceivedQuery,
     response=(200, ReceivedPageSchema), tag="messages")
async def received(request: web.Request) -> web.Response:
    query = parse_query(request, ReceivedQuery())
    return respond(ReceivedPageSchema(), await request.app[message_service_key].received(request[user_id_key], **query))


@doc("Messages sent, newest first", query=PageQuery, response=(200, SentPageSchema), tag="messages")
async def sent(request: web.Request) -> web.Response:
    query = parse_query(request, PageQuery())
    return respond(SentPageSchema(), await request.app[message_service_key].sent(request[user_id_key], **query))


@doc("Unread messages, oldest first, with the total unread count", query=LimitQuery, response=(200, UnreadSchema), tag="messages")
async def unread(request: web.Request) -> web.Response:
    query = parse_query(request, LimitQuery())
    return respond(UnreadSchema(), await request.app[message_service_key].unread(request[user_id_key], **query))


@doc("Number of unread messages", response=(200, CountSchema), tag="messages")
async def unread_count(request: web.Request) -> web.Response:
    count = await request.app[message_service_key].unread_count(request[user_id_key])
    return respond(CountSchema(), {"count": count})


@doc("One message the caller sent or received", response=(200, ReceivedMessageSchema), errors=(404,), tag="messages")
async def get_one(request: web.Request) -> web.Response:
    message = await request.app[message_service_key].get(request[user_id_key], path_id(request))
    return respond(ReceivedMessageSchema(), message)


@doc("Mark one received message read (idempotent)", response=(200, ReadOneSchema), errors=(404,), tag="messages")
async def read_one(request: web.Request) -> web.Response:
    result = await request.app[message_service_key].mark_one_read(request[user_id_key], path_id(request))
    return respond(ReadOneSchema(), result)


@doc("Mark several (ids) or all received messages read", body=MarkReadSchema, response=(200, MarkReadResultSchema), tag="messages")
async def read_many(request: web.Request) -> web.Response:
    body = await parse_body(request, MarkReadSchema())
    result = await request.app[message_service_key].mark_read(request[user_id_key], body.get("ids"))
    return respond(MarkReadResultSchema(), result)
