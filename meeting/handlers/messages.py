"""The messages REST API: send, inbox, sent box, receipts, unread, read marks.

Two views of a message: its sender's (SentMessageSchema: who received it, how many
read it) and a recipient's (ReceivedMessageSchema: how many received it, and the
reader's own read_at and seq). See docs/api.md.
"""

from aiohttp import web

from ..schemas import (
    CountSchema, MarkReadResultSchema, MarkReadSchema, PageQuery, ReadOneSchema, ReceiptsQuery, ReceiptsSchema,
    ReceivedMessageSchema, ReceivedPageSchema, ReceivedQuery, SendMessageSchema, SentMessageSchema, SentPageSchema,
    UnreadQuery, UnreadSchema,
)
from ..typedefs import message_service_key, user_id_key
from .common import doc, limit, parse_body, parse_query, path_id, respond
from .idempotency import keyed_body, respond_keyed

# Built once: schemas are stateless, and constructing one costs more than using it.
COUNT_SCHEMA = CountSchema()
MARK_READ_RESULT_SCHEMA = MarkReadResultSchema()
MARK_READ_SCHEMA = MarkReadSchema()
MESSAGE_SCHEMA = SentMessageSchema()
PAGE_QUERY = PageQuery()
RECEIPTS_QUERY = ReceiptsQuery()
RECEIPTS_SCHEMA = ReceiptsSchema()
READ_ONE_SCHEMA = ReadOneSchema()
RECEIVED_MESSAGE_SCHEMA = ReceivedMessageSchema()
RECEIVED_PAGE_SCHEMA = ReceivedPageSchema()
RECEIVED_QUERY = ReceivedQuery()
SEND_MESSAGE_SCHEMA = SendMessageSchema()
SENT_PAGE_SCHEMA = SentPageSchema()
UNREAD_QUERY = UnreadQuery()
UNREAD_SCHEMA = UnreadSchema()


@doc("Send a message to 1-1000 users", body=SendMessageSchema, response=(201, SentMessageSchema), errors=(403, 409, 429, 503), tag="messages",
     idempotent=True)
async def send(request: web.Request) -> web.Response:
    await limit(request, "sends_per_user", request[user_id_key])
    body, once = await keyed_body(request, SEND_MESSAGE_SCHEMA, MESSAGE_SCHEMA, 201)
    result = await request.app[message_service_key].send_message(request[user_id_key], **body, once=once)
    return respond_keyed(MESSAGE_SCHEMA, result, 201)


@doc("Messages received (box=inbox, the recipient's view): newest first, or with after_seq oldest first by seq; "
     "or sent (box=sent, the sender's view, with read counts), newest first", query=ReceivedQuery,
     response=(200, {"anyOf": [ReceivedPageSchema, SentPageSchema]}), tag="messages")
async def received(request: web.Request) -> web.Response:
    query = parse_query(request, RECEIVED_QUERY)
    service = request.app[message_service_key]
    if query.pop("box") == "sent":
        del query["after_seq"]
        return respond(SENT_PAGE_SCHEMA, await service.sent(request[user_id_key], **query))
    return respond(RECEIVED_PAGE_SCHEMA, await service.received(request[user_id_key], **query))


@doc("Messages sent, newest first (the same as GET /messages?box=sent)", query=PageQuery, response=(200, SentPageSchema),
     tag="messages")
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


@doc("One message the caller sent (the sender's view) or received (the recipient's view)",
     response=(200, {"anyOf": [SentMessageSchema, ReceivedMessageSchema]}), errors=(404,), tag="messages")
async def get_one(request: web.Request) -> web.Response:
    user_id = request[user_id_key]
    message = await request.app[message_service_key].get(user_id, path_id(request))
    return respond(MESSAGE_SCHEMA if message["sender_id"] == user_id else RECEIVED_MESSAGE_SCHEMA, message)


@doc("Who received a message the caller sent and when each read it (read_at null: not yet), in user id order; "
     "unread=true lists only those who have not read it. Anyone but the sender: 404", query=ReceiptsQuery,
     response=(200, ReceiptsSchema), errors=(404,), tag="messages")
async def receipts(request: web.Request) -> web.Response:
    query = parse_query(request, RECEIPTS_QUERY)
    result = await request.app[message_service_key].receipts(request[user_id_key], path_id(request), **query)
    return respond(RECEIPTS_SCHEMA, result)


@doc("Mark one received message read (idempotent)", response=(200, ReadOneSchema), errors=(404,), tag="messages")
async def read_one(request: web.Request) -> web.Response:
    result = await request.app[message_service_key].mark_one_read(request[user_id_key], path_id(request))
    return respond(READ_ONE_SCHEMA, result)


@doc("Mark several (ids) or all received messages read", body=MarkReadSchema, response=(200, MarkReadResultSchema), tag="messages")
async def read_many(request: web.Request) -> web.Response:
    body = await parse_body(request, MARK_READ_SCHEMA)
    result = await request.app[message_service_key].mark_read(request[user_id_key], body.get("ids"))
    return respond(MARK_READ_RESULT_SCHEMA, result)
