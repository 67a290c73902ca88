/**
 * Wire constants of the NBD protocol, named as in the specification
 * (NetworkBlockDevice/nbd, `doc/proto.md`).
 *
 * @module
 */

/** "NBDMAGIC": the first eight bytes a newstyle server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the magic that starts every client option and the newstyle greeting. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** The magic of every option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;

/** Handshake flag: the server speaks fixed newstyle. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1;
/** Handshake flag: the server may omit the 124 zero bytes after EXPORT_NAME. */
export const NBD_FLAG_NO_ZEROES = 2;
/** Client flag: the client speaks fixed newstyle. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1;
/** Client flag: the client does not want the 124 zero bytes. */
export const NBD_FLAG_C_NO_ZEROES = 2;

/** Option: choose an export, no reply on error (old-fashioned GO). */
export const NBD_OPT_EXPORT_NAME = 1;
/** Option: the client gives up. */
export const NBD_OPT_ABORT = 2;
/** Option: list the exports. */
export const NBD_OPT_LIST = 3;
/** Option: upgrade the connection to TLS. */
export const NBD_OPT_STARTTLS = 5;
/** Option: describe an export without choosing it. */
export const NBD_OPT_INFO = 6;
/** Option: describe an export and enter transmission. */
export const NBD_OPT_GO = 7;
/** Option: use structured replies. */
export const NBD_OPT_STRUCTURED_REPLY = 8;
/** Option: list metadata contexts. */
export const NBD_OPT_LIST_META_CONTEXT = 9;
/** Option: select metadata contexts for BLOCK_STATUS. */
export const NBD_OPT_SET_META_CONTEXT = 10;

/** Option reply: success, end of a list. */
export const NBD_REP_ACK = 1;
/** Option reply: one export of a LIST. */
export const NBD_REP_SERVER = 2;
/** Option reply: one piece of information for INFO or GO. */
export const NBD_REP_INFO = 3;
/** Option reply: one metadata context. */
export const NBD_REP_META_CONTEXT = 4;
const ERR = 0x80000000;
/** Option error: the option is not known or not supported. */
export const NBD_REP_ERR_UNSUP = ERR + 1;
/** Option error: forbidden by server policy. */
export const NBD_REP_ERR_POLICY = ERR + 2;
/** Option error: syntactically or semantically invalid. */
export const NBD_REP_ERR_INVALID = ERR + 3;
/** Option error: not available on this platform. */
export const NBD_REP_ERR_PLATFORM = ERR + 4;
/** Option error: TLS must be negotiated first. */
export const NBD_REP_ERR_TLS_REQD = ERR + 5;
/** Option error: no such export. */
export const NBD_REP_ERR_UNKNOWN = ERR + 6;
/** Option error: the server is shutting down. */
export const NBD_REP_ERR_SHUTDOWN = ERR + 7;
/** Option error: the client must ask for block sizes. */
export const NBD_REP_ERR_BLOCK_SIZE_REQD = ERR + 8;
/** Option error: the option's payload is too large. */
export const NBD_REP_ERR_TOO_BIG = ERR + 9;

/** Information item: size and transmission flags. */
export const NBD_INFO_EXPORT = 0;
/** Information item: the canonical export name. */
export const NBD_INFO_NAME = 1;
/** Information item: a human readable description. */
export const NBD_INFO_DESCRIPTION = 2;
/** Information item: minimum, preferred and maximum block sizes. */
export const NBD_INFO_BLOCK_SIZE = 3;

/** Transmission flag: the other flags are meaningful. */
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
/** Transmission flag: the export is read-only. */
export const NBD_FLAG_READ_ONLY = 1 << 1;
/** Transmission flag: FLUSH is supported. */
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
/** Transmission flag: the FUA command flag is supported. */
export const NBD_FLAG_SEND_FUA = 1 << 3;
/** Transmission flag: the export behaves like a rotational disk. */
export const NBD_FLAG_ROTATIONAL = 1 << 4;
/** Transmission flag: TRIM is supported. */
export const NBD_FLAG_SEND_TRIM = 1 << 5;
/** Transmission flag: WRITE_ZEROES is supported. */
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
/** Transmission flag: the DF command flag is supported. */
export const NBD_FLAG_SEND_DF = 1 << 7;
/** Transmission flag: several connections see one consistent export. */
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
/** Transmission flag: CACHE is supported. */
export const NBD_FLAG_SEND_CACHE = 1 << 10;
/** Transmission flag: the FAST_ZERO command flag is supported. */
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

/** The magic of every request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** The magic of a simple reply. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** The magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Command: read. */
export const NBD_CMD_READ = 0;
/** Command: write. */
export const NBD_CMD_WRITE = 1;
/** Command: disconnect. */
export const NBD_CMD_DISC = 2;
/** Command: flush. */
export const NBD_CMD_FLUSH = 3;
/** Command: trim (discard). */
export const NBD_CMD_TRIM = 4;
/** Command: prefetch into cache. */
export const NBD_CMD_CACHE = 5;
/** Command: write zeroes. */
export const NBD_CMD_WRITE_ZEROES = 6;
/** Command: query block status. */
export const NBD_CMD_BLOCK_STATUS = 7;

/** Command flag: force unit access. */
export const NBD_CMD_FLAG_FUA = 1 << 0;
/** Command flag: WRITE_ZEROES must not punch a hole. */
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
/** Command flag: READ must not be fragmented. */
export const NBD_CMD_FLAG_DF = 1 << 2;
/** Command flag: BLOCK_STATUS should return one extent only. */
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
/** Command flag: WRITE_ZEROES must fail fast unless it is fast. */
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply flag: the last chunk of this reply. */
export const NBD_REPLY_FLAG_DONE = 1;
/** Structured reply type: no payload. */
export const NBD_REPLY_TYPE_NONE = 0;
/** Structured reply type: data at an offset. */
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
/** Structured reply type: a hole at an offset. */
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
/** Structured reply type: block status descriptors. */
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Structured reply type: an error. */
export const NBD_REPLY_TYPE_ERROR = 0x8001;
/** Structured reply type: an error at an offset. */
export const NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002;

/** `base:allocation` flag: the extent is a hole. */
export const NBD_STATE_HOLE = 1;
/** `base:allocation` flag: the extent reads as zeroes. */
export const NBD_STATE_ZERO = 2;

/** The one metadata context this server knows. */
export const BASE_ALLOCATION = "base:allocation";

/** Errno values carried on the wire. */
export const NBD_EPERM = 1;
/** I/O error. */
export const NBD_EIO = 5;
/** Out of memory. */
export const NBD_ENOMEM = 12;
/** Invalid argument. */
export const NBD_EINVAL = 22;
/** No space left. */
export const NBD_ENOSPC = 28;
/** Value too large. */
export const NBD_EOVERFLOW = 75;
/** Operation not supported. */
export const NBD_ENOTSUP = 95;
/** Server shutting down. */
export const NBD_ESHUTDOWN = 108;

/** The longest string (export name, description, context) the spec allows. */
export const NBD_MAX_STRING = 4096;
