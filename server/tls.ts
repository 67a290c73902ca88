/**
 * TLS as nbdkit does it: `--tls=off|on|require`, a certificate folder
 * (`--tls-certificates`, or nbdkit's default folder), pre-shared keys
 * (`--tls-psk`), client certificates (`--tls-verify-peer`); everything is
 * read and checked at start-up, so that a mistake is a one-line error before
 * the server listens. Per connection, {@linkcode tlsUpgrade} gives the
 * handshake its STARTTLS.
 *
 * @module
 */
import { ByteReader } from "../protocol/byte_reader.ts";
import type { TlsUpgrade } from "../protocol/handshake.ts";
import { ProtocolError } from "../protocol/wire.ts";
import { messageOf } from "../plugins/errors.ts";
import { runtime } from "../runtime/mod.ts";
import type { Connection, PemFile, TlsServerOptions } from "../runtime/types.ts";

/** `--tls`: refused, offered (the client chooses), or required. */
export type TlsMode = "off" | "on" | "require";

/** TLS as asked for on the command line. */
export interface TlsSettings {
  /**
   * `--tls`. Absent, as with nbdkit: on when `--tls-psk` or
   * `--tls-certificates` is given, or when the default folder holds
   * certificates; off otherwise.
   */
  mode?: TlsMode;
  /** `--tls-certificates`: the folder of `ca-cert.pem`, `server-cert.pem`, `server-key.pem`. */
  certificates?: string;
  /** `--tls-psk`: a file of `identity:hexkey` lines (psktool's format); replaces certificates. */
  psk?: string;
  /** `--tls-verify-peer`: refuse clients without a certificate signed by `ca-cert.pem`. */
  verifyPeer?: boolean;
}

/** TLS ready to serve (the `tls` of `startServer`). */
export interface TlsConfig {
  /** `--tls=require`: nothing but STARTTLS and ABORT before TLS. */
  required: boolean;
  /** The credentials, read and checked. */
  options: TlsServerOptions;
}

/**
 * The value of `$tls` in captive mode, as nbdkit's.
 *
 * @param config The server's TLS, or null without.
 * @returns 0 off, 1 on, 2 required.
 */
export function tlsLevel(config: TlsConfig | null): 0 | 1 | 2 {
  return config === null ? 0 : config.required ? 2 : 1;
}

/**
 * nbdkit's folders for certificates when `--tls-certificates` is absent:
 * `/etc/pki/nbdkit` for root, else `$HOME/.pki/nbdkit` then
 * `$HOME/.config/pki/nbdkit`.
 *
 * @returns The folders, in the order they are tried.
 */
export function defaultCertificateDirs(): string[] {
  if (runtime.uid() === 0) return ["/etc/pki/nbdkit"];
  const home = runtime.env("HOME");
  return home ? [`${home}/.pki/nbdkit`, `${home}/.config/pki/nbdkit`] : [];
}

/** PEM files and keys are small; anything bigger is not one. */
const MAX_FILE = 1 << 20;

async function readText(path: string): Promise<string> {
  const info = await runtime.stat(path);
  if (info === null) throw new Error(`${path}: No such file or directory`);
  if (info.kind !== "file") throw new Error(`${path}: not a regular file`);
  if (info.size > MAX_FILE) throw new Error(`${path}: too big (${info.size} bytes)`);
  let file;
  try {
    file = await runtime.openFile(path, { write: false });
  } catch (err) {
    throw new Error(`${path}: ${messageOf(err)}`);
  }
  try {
    const bytes = new Uint8Array(await file.size());
    await file.pread(bytes, 0);
    return new TextDecoder().decode(bytes);
  } finally {
    await file.close();
  }
}

/**
 * Read nbdkit's certificate folder: `ca-cert.pem`, `server-cert.pem` and
 * `server-key.pem` are required (as nbdkit requires them), `ca-crl.pem` is
 * used when present.
 */
async function loadCertificates(dir: string, verifyPeer: boolean): Promise<TlsServerOptions> {
  const info = await runtime.stat(dir);
  if (info === null) throw new Error(`${dir}: No such file or directory`);
  if (info.kind !== "directory") throw new Error(`${dir}: not a directory`);
  const base = dir.endsWith("/") ? dir : `${dir}/`;
  const read = async (name: string): Promise<PemFile> => {
    const path = base + name;
    return { path, pem: await readText(path) };
  };
  const ca = await read("ca-cert.pem");
  const cert = await read("server-cert.pem");
  const key = await read("server-key.pem");
  const crl = (await runtime.stat(`${base}ca-crl.pem`)) ? await read("ca-crl.pem") : undefined;
  return { ca, cert, key, crl, verifyPeer };
}

/**
 * Parse a PSK file as psktool writes it: one `identity:hexkey` per line;
 * empty lines are skipped; the first line of an identity wins.
 *
 * @param text The file's contents.
 * @param path The file's name, for messages.
 * @returns The keys by identity.
 * @throws {Error} A one-line message naming the first bad line.
 *
 * @example
 * ```ts
 * import { parsePskFile } from "./tls.ts";
 * const keys = parsePskFile("alice:00ff10\n", "keys.psk");
 * console.assert(keys.get("alice")?.join() === "0,255,16");
 * ```
 */
export function parsePskFile(text: string, path: string): Map<string, Uint8Array> {
  const keys = new Map<string, Uint8Array>();
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].replace(/\r$/, "");
    if (line.trim() === "") continue;
    const colon = line.indexOf(":");
    const hex = line.slice(colon + 1);
    if (colon <= 0 || !/^(?:[0-9a-fA-F]{2})+$/.test(hex)) {
      throw new Error(`${path}:${i + 1}: expected 'identity:hexkey' (as psktool writes)`);
    }
    const identity = line.slice(0, colon);
    if (keys.has(identity)) continue;
    const key = new Uint8Array(hex.length / 2);
    for (let j = 0; j < key.length; j++) key[j] = parseInt(hex.slice(2 * j, 2 * j + 2), 16);
    keys.set(identity, key);
  }
  if (keys.size === 0) throw new Error(`${path}: no keys (expected 'identity:hexkey' lines)`);
  return keys;
}

/**
 * Read and check the TLS credentials that `settings` ask for, as nbdkit
 * chooses them: `--tls=off` ignores everything else; `--tls-psk` replaces
 * certificates; without `--tls-certificates`, nbdkit's default folder.
 * Unlike nbdkit, credentials that were asked for and cannot be used are an
 * error, never a warning that leaves TLS off; only the default folder, when
 * `--tls` is absent, falls back silently to no TLS.
 *
 * @param settings What the command line asks for.
 * @returns The configuration, or null for no TLS.
 * @throws {Error} A one-line message: a missing file, a bad key, a bad PSK
 *   line, or something this runtime's TLS cannot do.
 */
export async function loadTls(settings: TlsSettings): Promise<TlsConfig | null> {
  const { mode, certificates, psk } = settings;
  if (mode === "off") return null;
  const verifyPeer = settings.verifyPeer ?? false;
  let options: TlsServerOptions;
  if (psk !== undefined) {
    options = await prefixed("--tls-psk", async () => ({
      verifyPeer,
      psk: parsePskFile(await readText(psk), psk),
    }));
  } else if (certificates !== undefined) {
    options = await prefixed(
      "--tls-certificates",
      () => loadCertificates(certificates, verifyPeer),
    );
  } else {
    const dirs = defaultCertificateDirs();
    try {
      let dir: string | undefined;
      for (const d of dirs) {
        if ((await runtime.stat(d))?.kind === "directory") {
          dir = d;
          break;
        }
      }
      if (dir === undefined) {
        throw new Error(
          `no certificates in ${dirs.join(" or ") || "$HOME/.pki/nbdkit ($HOME unset)"}`,
        );
      }
      options = await loadCertificates(dir, verifyPeer);
      await runtime.prepareTls(options);
      return { required: mode === "require", options };
    } catch (err) {
      // nbdkit: without --tls, certificates that are not there mean no TLS.
      if (mode === undefined) return null;
      throw new Error(
        `--tls=${mode}: ${messageOf(err)} (give --tls-certificates=DIR or --tls-psk=FILE)`,
      );
    }
  }
  // Its messages name the file, or the option this runtime cannot do.
  await runtime.prepareTls(options);
  return { required: mode === "require", options };
}

async function prefixed<T>(option: string, load: () => Promise<T>): Promise<T> {
  try {
    return await load();
  } catch (err) {
    throw new Error(`${option}: ${messageOf(err)}`);
  }
}

/**
 * The STARTTLS of one connection: swaps the connection's transport for a TLS
 * session over it.
 *
 * @param config The server's TLS.
 * @param conn The client's connection, in clear.
 * @param events `secure`: the TLS connection and its writer, once
 *   established (the server closes those from then on: the handshake may end
 *   there, after NBD_OPT_ABORT's reply, say).
 * @returns The hook for the handshake.
 */
export function tlsUpgrade(
  config: TlsConfig,
  conn: Connection,
  events: {
    secure(secure: Connection, writer: WritableStreamDefaultWriter<Uint8Array>): void;
  },
): TlsUpgrade {
  return {
    required: config.required,
    async start(reader, writer) {
      if (!conn.startTls) throw new Error("TLS is not available on this kind of connection");
      // Bytes sent in clear after STARTTLS must never be taken as protected.
      if (reader.leftover().length > 0) {
        throw new ProtocolError("client sent data after NBD_OPT_STARTTLS before the reply");
      }
      reader.release();
      writer.releaseLock();
      const secure = await conn.startTls(config.options);
      const secureReader = new ByteReader(secure.readable);
      const secureWriter = secure.writable.getWriter();
      events.secure(secure, secureWriter);
      return { reader: secureReader, writer: secureWriter };
    },
  };
}
