'use strict';
// The browser origins allowed to call the credits API, resolved by Serverless for
// serverless.yml (`${file(./deploy/cors_origins.js)}`):
//   origins  a list, one entry per origin: API Gateway answers preflights itself and
//            compares the Origin header with each entry (one "a,b" entry matches none);
//   joined   the same, comma-separated, for the function's CORS_ALLOW_ORIGINS.
//
// Packaging reads them from CREDITS_CORS_ALLOW_ORIGINS (comma-separated); only the dev
// stage defaults to http://localhost:3000. Any other stage needs https origins that are
// not the local machine. Deploying a package (`serverless deploy --package <dir>`)
// takes them from the packaged template, which is what API Gateway gets, checks them
// the same way, and refuses a package made for another stage: the shell's environment
// at deploy time plays no part.

const fs = require('fs');
const path = require('path');

const DEV_STAGE = 'dev';
const DEV_DEFAULT = 'http://localhost:3000';
const LOCAL_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]', '0.0.0.0']);

function refuse(message) {
  const error = new Error(message);
  error.stack = message; // Serverless prints the stack: only the reason is useful here
  return error;
}

function parse(value) {
  return String(value || '')
    .split(',')
    .map((origin) => origin.trim().replace(/\/+$/, ''))
    .filter(Boolean);
}

function problems(origins, stage) {
  if (stage === DEV_STAGE) return origins.length ? [] : ['the list is empty'];
  if (!origins.length) return ['CREDITS_CORS_ALLOW_ORIGINS is not set'];
  const found = [];
  for (const origin of origins) {
    let url;
    try {
      url = new URL(origin);
    } catch (error) {
      found.push(`${origin} is not an origin`);
      continue;
    }
    if (url.protocol !== 'https:') found.push(`${origin} is not https`);
    else if (LOCAL_HOSTS.has(url.hostname) || url.hostname.endsWith('.localhost')) {
      found.push(`${origin} is the local machine`);
    } else if (url.origin !== origin) found.push(`${origin} is not an origin (scheme://host[:port] only)`);
  }
  return found;
}

function fromPackage(directory, stage) {
  const state = JSON.parse(fs.readFileSync(path.join(directory, 'serverless-state.json'), 'utf8'));
  if (state.service.provider.stage !== stage) {
    throw refuse(
      `The package in ${directory} was made for stage ${state.service.provider.stage}, not ${stage}: ` +
        `run ./dev package --stage ${stage}`
    );
  }
  const template = state.service.provider.compiledCloudFormationTemplate;
  const origins = template.Resources.HttpApi.Properties.CorsConfiguration.AllowOrigins;
  if (!Array.isArray(origins)) throw refuse(`The package in ${directory} has no list of CORS origins`);
  return origins;
}

module.exports = async ({ options, resolveVariable }) => {
  const stage = await resolveVariable('sls:stage');
  // `serverless package --package <dir>` writes a package, `serverless deploy --package <dir>` reads one.
  const packaged = Boolean(options.package) && process.argv[2] === 'deploy';
  const origins = packaged
    ? fromPackage(options.package, stage)
    : parse(process.env.CREDITS_CORS_ALLOW_ORIGINS || (stage === DEV_STAGE ? DEV_DEFAULT : ''));
  const found = problems(origins, stage);
  if (found.length) {
    throw refuse(
      `CORS origins for stage ${stage}${packaged ? ` in the package ${options.package}` : ''}: ` +
        `${found.join('; ')}. Set CREDITS_CORS_ALLOW_ORIGINS to your app's https origin(s), ` +
        'comma-separated (e.g. https://app.example.com), and run ./dev package again.'
    );
  }
  return { origins, joined: origins.join(',') };
};
