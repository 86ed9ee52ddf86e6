// A tiny OpenID provider (panva/oidc-provider) for the SSO tests, on loopback only.
//
//   node tests/oidc/server.mjs PORT [CONFIG.json]
//
// CONFIG (all optional):
//   registration_token  initial access token for dynamic client registration (RFC 7591)
//   default_user        subject signed in when the interaction names none
//   accounts            { sub: { preferred_username, email, ... } }
//
// Tests register the gateway as a client once they know its port (POST /reg with the
// initial access token); this test provider lets them choose `client_id` and
// `client_secret`, and an optional `x_tamper` ({claims, kid, alg}) under which it
// re-signs the ID token it issues, to play a misbehaving provider.
//
// There is no login UI: GET /interaction/{uid} signs in `?user=SUB` (default_user) at
// once, optionally with `&preferred_username=NAME` (for that login only), or refuses
// with `?deny=1` (error=access_denied). Consent is implied for every client
// (loadExistingGrant).
// Prints "listening <issuer>" on stdout when ready.

import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

import { decodeJwt, exportJWK, generateKeyPair, SignJWT } from 'jose';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node server.mjs PORT [CONFIG.json]');
  process.exit(2);
}
const config = process.argv[3] ? JSON.parse(readFileSync(process.argv[3], 'utf8')) : {};
const issuer = `http://127.0.0.1:${port}`;
const defaultUser = config.default_user ?? 'alice-0001';
const configured = config.accounts ?? {
  [defaultUser]: { preferred_username: 'alice', email: 'alice@example.com' },
};
// claims per subject as of its last login (the configured ones plus that login's overrides)
const accounts = new Map(Object.entries(configured));

const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const kid = 'test-rs256';
const signingJwk = { ...(await exportJWK(privateKey)), kid, alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  jwks: { keys: [signingJwk] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
  },
  async findAccount(_ctx, sub) {
    if (!accounts.has(sub)) return undefined;
    return { accountId: sub, claims: async () => ({ sub, ...accounts.get(sub) }) };
  },
  // put the scopes' claims (preferred_username) in the ID token, as corporate providers do
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    // RFC 7662, for the gateway's introspection validator (it refuses JWTs: 400)
    introspection: { enabled: true },
    registration: {
      enabled: true,
      initialAccessToken: config.registration_token ?? 'registration-token',
      idFactory: (ctx) => ctx.oidc.body.client_id ?? randomUUID(),
      secretFactory: async (ctx) => ctx.oidc.body.client_secret
        ?? randomBytes(32).toString('base64url'),
    },
  },
  extraClientMetadata: {
    properties: ['x_tamper'],
    validator(_ctx, key, value) {
      if (key === 'x_tamper' && value !== undefined && typeof value !== 'object') {
        throw new Error('x_tamper must be an object');
      }
    },
  },
  enabledJWA: {
    idTokenSigningAlgValues: ['RS256', 'HS256'],
  },
  pkce: { required: () => true },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  async loadExistingGrant(ctx) {
    const { client, session } = ctx.oidc;
    const grantId = ctx.oidc.result?.consent?.grantId ?? session.grantIdFor(client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: client.clientId,
      accountId: session.accountId });
    grant.addOIDCScope('openid profile email');
    await grant.save();
    session.grantIdFor(client.clientId, grant.jti);
    return grant;
  },
});

function b64url(obj) {
  return Buffer.from(JSON.stringify(obj)).toString('base64url');
}

// A misbehaving provider: re-sign the ID token with changed claims, header or algorithm.
async function tamper(idToken, how) {
  const payload = { ...decodeJwt(idToken) };
  for (const [name, value] of Object.entries(how.claims ?? {})) {
    if (value === null) delete payload[name];
    else payload[name] = value;
  }
  if (how.alg === 'none') return `${b64url({ alg: 'none' })}.${b64url(payload)}.`;
  return new SignJWT(payload)
    .setProtectedHeader({ alg: 'RS256', kid: how.kid ?? kid })
    .sign(privateKey);
}

provider.use(async (ctx, next) => {
  await next();
  const how = ctx.oidc?.client?.metadata().x_tamper;
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body?.id_token && how) {
    ctx.body = { ...ctx.body, id_token: await tamper(ctx.body.id_token, how) };
  }
});

async function interaction(req, res, url) {
  if (url.searchParams.get('deny')) {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'The user declined the sign-in.',
    }, { mergeWithLastSubmission: false });
    return;
  }
  const details = await provider.interactionDetails(req, res);
  if (details.prompt.name !== 'login') {
    res.statusCode = 400;
    res.end(`unexpected prompt ${details.prompt.name}`);
    return;
  }
  const sub = url.searchParams.get('user') ?? defaultUser;
  const claims = { ...(configured[sub] ?? {}) };
  const name = url.searchParams.get('preferred_username');
  if (name !== null) claims.preferred_username = name;
  accounts.set(sub, claims);
  await provider.interactionFinished(req, res, { login: { accountId: sub } },
    { mergeWithLastSubmission: false });
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  const url = new URL(req.url, issuer);
  if (req.method === 'GET' && url.pathname.startsWith('/interaction/')) {
    interaction(req, res, url).catch((err) => {
      res.statusCode = 500;
      res.end(`interaction failed: ${err.message}`);
    });
    return;
  }
  callback(req, res);
});
server.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
