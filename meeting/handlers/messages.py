"""The messages REST API: send, inbox, sent, unread, read marks."""

from aiohttp import web

from ..schemas import (
    CountSchema, MarkReadResultSchema, MarkReadSchema, MessageSchema, PageQuery, ReadOneSchema, ReceivedMessageSchema,
    ReceivedPageSchema, ReceivedQuery, SendMessageSchema, SentPageSchema, UnreadQuery, UnreadSchema,
)
from ..typedefs import message_service_key, user_id_key
from .common import doc, limit, parse_body, parse_query, path_id, respond
from .idempotency import keyed_body, respond_keyed

# Built once: schemas are stateless, and constructing one costs more than using it.
COUNT_SCHEMA = CountSchema()
MARK_READ_RESULT_SCHEMA = MarkReadResultSchema()
MARK_READ_SCHEMA = MarkReadSchema()
MESSAGE_SCHEMA = MessageSchema()
PAGE_QUERY = PageQuery()
READ_ONE_SCHEMA = ReadOneSchema()
RECEIVED_MESSAGE_SCHEMA = ReceivedMessageSchema()
RECEIVED_PAGE_SCHEMA = ReceivedPageSchema()
RECEIVED_QUERY = ReceivedQuery()
SEND_MESSAGE_SCHEMA = SendMessageSchema()
SENT_PAGE_SCHEMA = SentPageSchema()
UNREAD_QUERY = UnreadQuery()
UNREAD_SCHEMA = UnreadSchema()


@doc("Send a message to 1-1000 users", body=SendMessageSchema, response=(201, MessageSchema), errors=(403, 409, 429, 503), tag="messages",
     idempotent=True)
async def send(request: web.Request) -> web.Response:
    await limit(request, "sends_per_user", request[user_id_key])
    body, once = await keyed_body(request, SEND_MESSAGE_SCHEMA, MESSAGE_SCHEMA, 201)
    result = await request.app[message_service_key].send_message(request[user_id_key], **body, once=once)
    return respond_keyed(MESSAGE_SCHEMA, result, 201)


@doc("Messages received: newest first, or with after_seq oldest first by seq", query=ReceivedQuery,
     response=(200, ReceivedPageSchema), tag="messages")
async def received(request: web.Request) -> web.Response:
    query = parse_query(request, RECEIVED_QUERY)
    return respond(RECEIVED_PAGE_SCHEMA, await request.app[message_service_key].received(request[user_id_key], **query))


@doc("Messages sent, newest first", query=PageQuery, response=(200, SentPageSchema), tag="messages")
async def sent(request: web.Request) -> web.Response:
    query = parse_query(request, PAGE_QUERY)
    return respond(SENT_PAGE_SCHEMA, await request.app[message_service_key].sent(request[user_id_key], **query))


@doc("Unread messages, oldest first by seq (page with after_seq = the previous next_after_seq), with the total unread count",
     query=UnreadQuery, response=(200, UnreadSchema), tag="messages")
async def unread(request: web.Request) -> web.Response:
    query = parse_query(request, UNREAD_QUERY)
    return respond(UNREAD_SCHEMA, await request.app[message_service_key].unread(request[user_id_key], **query))


@doc("Number of unread messages", response=(200, CountSchema), tag="messages")
async def unread_count(request: web.Request) -> web.Response:
    count = await request.app[message_service_key].unread_count(request[user_id_key])
    return respond(COUNT_SCHEMA, {"count": count})


@doc("One message the caller sent or received", response=(200, ReceivedMessageSchema), errors=(404,), tag="messages")
async def get_one(request: web.Request) -> web.Response:
    message = await request.app[message_service_key].get(request[user_id_key], path_id(request))
    return respond(RECEIVED_MESSAGE_SCHEMA, message)


@doc("Mark one received message read (idempotent)", response=(200, ReadOneSchema), errors=(404,), tag="messages")
async def read_one(request: web.Request) -> web.Response:
    result = await request.app[message_service_key].mark_one_read(request[user_id_key], path_id(request))
    return respond(READ_ONE_SCHEMA, result)


@doc("Mark several (ids) or all received messages read", body=MarkReadSchema, response=(200, MarkReadResultSchema), tag="messages")
async def read_many(request: web.Request) -> web.Response:
    body = await parse_body(request, MARK_READ_SCHEMA)
    result = await request.app[message_service_key].mark_read(request[user_id_key], body.get("ids"))
    return respond(MARK_READ_RESULT_SCHEMA, result)
