/**
 * The spec's names of options and commands, for messages.
 *
 * @module
 */
import {
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from "./constants.ts";

const OPTIONS: Record<number, string> = {
  1: "NBD_OPT_EXPORT_NAME",
  2: "NBD_OPT_ABORT",
  3: "NBD_OPT_LIST",
  4: "NBD_OPT_PEEK_EXPORT",
  5: "NBD_OPT_STARTTLS",
  6: "NBD_OPT_INFO",
  7: "NBD_OPT_GO",
  8: "NBD_OPT_STRUCTURED_REPLY",
  9: "NBD_OPT_LIST_META_CONTEXT",
  10: "NBD_OPT_SET_META_CONTEXT",
  11: "NBD_OPT_EXTENDED_HEADERS",
};

const REPLIES: Record<number, string> = {
  [NBD_REP_ACK]: "NBD_REP_ACK",
  [NBD_REP_SERVER]: "NBD_REP_SERVER",
  [NBD_REP_INFO]: "NBD_REP_INFO",
  [NBD_REP_META_CONTEXT]: "NBD_REP_META_CONTEXT",
  [NBD_REP_ERR_UNSUP]: "NBD_REP_ERR_UNSUP",
  [NBD_REP_ERR_POLICY]: "NBD_REP_ERR_POLICY",
  [NBD_REP_ERR_INVALID]: "NBD_REP_ERR_INVALID",
  [NBD_REP_ERR_PLATFORM]: "NBD_REP_ERR_PLATFORM",
  [NBD_REP_ERR_TLS_REQD]: "NBD_REP_ERR_TLS_REQD",
  [NBD_REP_ERR_UNKNOWN]: "NBD_REP_ERR_UNKNOWN",
  [NBD_REP_ERR_SHUTDOWN]: "NBD_REP_ERR_SHUTDOWN",
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: "NBD_REP_ERR_BLOCK_SIZE_REQD",
  [NBD_REP_ERR_TOO_BIG]: "NBD_REP_ERR_TOO_BIG",
};

const COMMANDS: Record<number, string> = {
  0: "NBD_CMD_READ",
  1: "NBD_CMD_WRITE",
  2: "NBD_CMD_DISC",
  3: "NBD_CMD_FLUSH",
  4: "NBD_CMD_TRIM",
  5: "NBD_CMD_CACHE",
  6: "NBD_CMD_WRITE_ZEROES",
  7: "NBD_CMD_BLOCK_STATUS",
  8: "NBD_CMD_RESIZE",
};

/**
 * The name of an option number.
 *
 * @param option The option.
 * @returns Its `NBD_OPT_*` name, or "unknown option N".
 */
export function optionName(option: number): string {
  return OPTIONS[option] ?? `unknown option ${option}`;
}

/**
 * The name of an option reply type.
 *
 * @param type The reply type.
 * @returns Its `NBD_REP_*` name, or "unknown reply N".
 */
export function replyName(type: number): string {
  return REPLIES[type] ?? `unknown reply ${type}`;
}

/**
 * The name of a command number.
 *
 * @param command The command.
 * @returns Its `NBD_CMD_*` name, or "unknown command N".
 */
export function commandName(command: number): string {
  return COMMANDS[command] ?? `unknown command ${command}`;
}
