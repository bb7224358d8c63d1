// panva/oidc-provider (an OpenID Certified provider) over HTTPS on loopback, set up
// as an API's authorization server: one client with the client_credentials grant,
// resource indicators (RFC 8707), and RS256 JWT access tokens (RFC 9068) carrying a
// `groups` claim. interop/run.py starts it and points jitgate's verifier at it.
//
//   node server.mjs --cert idp.pem --key idp.key [--host 127.0.0.1] [--port 0]
//                   [--client-id interop-agent] [--groups platform]
//                   [--audience api://jitgate]
//
// The client secret comes from $OIDC_CLIENT_SECRET (not argv, which any user can
// read). When listening, it prints one line to stdout, the issuer URL, and logs
// everything else to stderr. SIGTERM or SIGINT stops it.
//
// Resources it knows (anything else is invalid_target):
//   <audience>                         5-minute tokens for jitgate (the default resource)
//   urn:jitgate:interop:short-lived    2-second tokens, also with aud <audience>
//   api://another-api                  5-minute tokens for some other API

import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    cert: { type: 'string' },
    key: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'client-id': { type: 'string', default: 'interop-agent' },
    groups: { type: 'string', default: 'platform' },
    audience: { type: 'string', default: 'api://jitgate' },
  },
  strict: true,
});

function fail(message) {
  process.stderr.write(`oidc-provider interop server: ${message}\n`);
  process.exit(2);
}

if (!args.cert || !args.key) fail('--cert and --key are required');
const secret = process.env.OIDC_CLIENT_SECRET;
if (!secret || secret.length < 32) fail('$OIDC_CLIENT_SECRET must hold at least 32 characters');
const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad --port ${args.port}`);

const clientId = args['client-id'];
const groups = args.groups.split(',').map((g) => g.trim()).filter(Boolean);
const SHORT_LIVED = 'urn:jitgate:interop:short-lived';
const OTHER_API = 'api://another-api';
const RS256 = { sign: { alg: 'RS256' } };
const resourceServers = {
  [args.audience]: { scope: '', accessTokenFormat: 'jwt', accessTokenTTL: 300, jwt: RS256 },
  [SHORT_LIVED]: {
    scope: '',
    audience: args.audience,
    accessTokenFormat: 'jwt',
    accessTokenTTL: 2,
    jwt: RS256,
  },
  [OTHER_API]: { scope: '', accessTokenFormat: 'jwt', accessTokenTTL: 300, jwt: RS256 },
};

// A fresh signing key per run: nothing to keep on disk.
const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = {
  ...privateKey.export({ format: 'jwk' }),
  kid: `interop-${crypto.randomBytes(6).toString('hex')}`,
  alg: 'RS256',
  use: 'sig',
};

// Listen first, so that the issuer URL can name the port the kernel chose.
const server = https.createServer({
  cert: readFileSync(args.cert),
  key: readFileSync(args.key),
  minVersion: 'TLSv1.2',
});
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, args.host, resolve);
});
const host = args.host.includes(':') ? `[${args.host}]` : args.host;
const issuer = `https://${host}:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => args.audience,
      useGrantedResource: () => true,
      getResourceServerInfo(ctx, resource) {
        const info = resourceServers[resource];
        if (!info) throw new errors.InvalidTarget();
        return info;
      },
    },
  },
  // The groups claim jitgate's policy reads, added to this client's access tokens.
  extraTokenClaims(ctx, token) {
    if (token.kind === 'ClientCredentials' && token.clientId === clientId) {
      return { groups };
    }
    return undefined;
  },
  ttl: {
    ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 300,
  },
});

provider.on('grant.success', (ctx) => {
  const { params, client } = ctx.oidc;
  const resource = params?.resource ?? '(default)';
  process.stderr.write(`issued a token to ${client?.clientId} for resource ${resource}\n`);
});
provider.on('grant.error', (ctx, error) => {
  process.stderr.write(`refused a token request: ${error.error}: ${error.error_description}\n`);
});
provider.on('server_error', (ctx, error) => {
  process.stderr.write(`server error: ${error.stack}\n`);
});

server.on('request', provider.callback());
process.stdout.write(`${issuer}\n`);

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
