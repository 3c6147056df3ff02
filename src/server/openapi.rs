//! The OpenAPI 3.0 document of the API, served at `/v1/openapi.json`
//! (without a key). It describes the routes of [`super::router`] and the
//! bodies of [`crate::api`]; `tests/openapi.rs` checks the live server
//! against it with schemathesis.

use serde_json::{json, Value};

fn error_responses() -> Value {
    json!({
        "default": {
            "description": "An error: its status and a body naming what went wrong",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
    })
}

fn ok_json(schema: Value, description: &str) -> Value {
    let mut r = error_responses();
    r["200"] = json!({
        "description": description,
        "content": {"application/json": {"schema": schema}}
    });
    r
}

fn ndjson(description: &str) -> Value {
    let mut r = error_responses();
    r["200"] = json!({
        "description": description,
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}}
    });
    r
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn id_param() -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}
    })
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema(name)}}})
}

/// The document.
pub fn document() -> Value {
    let machine = || ok_json(schema("Machine"), "The machine");
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "smol serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The smol local engine over HTTP: microVMs to create, exec in, move files in and out of, fork, and run OCI images in."
        },
        "servers": [{"url": "/"}],
        "security": [{"key": []}],
        "paths": {
            "/v1/machines": {
                "post": {
                    "operationId": "createMachine",
                    "requestBody": body("CreateMachine"),
                    "responses": machine()
                },
                "get": {
                    "operationId": "listMachines",
                    "responses": ok_json(json!({"type": "array", "items": schema("Machine")}), "This key's machines")
                }
            },
            "/v1/machines/{id}": {
                "parameters": [id_param()],
                "get": {"operationId": "getMachine", "responses": machine()},
                "delete": {
                    "operationId": "deleteMachine",
                    "responses": {
                        "204": {"description": "Deleted"},
                        "default": error_responses()["default"].clone()
                    }
                }
            },
            "/v1/machines/{id}/start": {
                "parameters": [id_param()],
                "post": {"operationId": "startMachine", "responses": machine()}
            },
            "/v1/machines/{id}/stop": {
                "parameters": [id_param()],
                "post": {"operationId": "stopMachine", "responses": machine()}
            },
            "/v1/machines/{id}/fork": {
                "parameters": [id_param()],
                "post": {"operationId": "forkMachine", "requestBody": body("Fork"), "responses": machine()}
            },
            "/v1/machines/{id}/exec": {
                "parameters": [id_param()],
                "post": {
                    "operationId": "exec",
                    "requestBody": body("Exec"),
                    "responses": ok_json(schema("ExecResult"), "The finished command")
                }
            },
            "/v1/machines/{id}/exec/stream": {
                "parameters": [id_param()],
                "post": {
                    "operationId": "execStream",
                    "requestBody": body("Exec"),
                    "responses": ndjson("One JSON event a line, live: started, stdout, stderr (base64 data), exit, error, failed")
                }
            },
            "/v1/machines/{id}/files": {
                "parameters": [
                    id_param(),
                    {"name": "path", "in": "query", "required": true, "schema": {"type": "string"}}
                ],
                "get": {
                    "operationId": "readFile",
                    "responses": {
                        "200": {
                            "description": "The file's bytes, streamed",
                            "headers": {
                                "x-smol-size": {"schema": {"type": "integer"}},
                                "x-smol-mode": {"schema": {"type": "string"}}
                            },
                            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
                        },
                        "default": error_responses()["default"].clone()
                    }
                },
                "put": {
                    "operationId": "writeFile",
                    "parameters": [
                        {"name": "mode", "in": "query", "required": false, "schema": {"type": "string", "pattern": "^[0-7]{1,4}$"}}
                    ],
                    "requestBody": {
                        "required": true,
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
                    },
                    "responses": ok_json(schema("Written"), "Written")
                }
            },
            "/v1/machines/{id}/ports": {
                "parameters": [id_param()],
                "get": {
                    "operationId": "listPorts",
                    "responses": ok_json(json!({"type": "array", "items": schema("PortMapping")}), "The forwarded ports listening now, on the server's host")
                }
            },
            "/v1/machines/{id}/images": {
                "parameters": [id_param()],
                "get": {
                    "operationId": "listImages",
                    "responses": ok_json(json!({"type": "array", "items": schema("Image")}), "The machine's images")
                }
            },
            "/v1/machines/{id}/images/pull": {
                "parameters": [id_param()],
                "post": {
                    "operationId": "pullImage",
                    "requestBody": body("Pull"),
                    "responses": ndjson("One JSON line per progress event, then done (with the image) or failed")
                }
            },
            "/v1/machines/{id}/run": {
                "parameters": [id_param()],
                "post": {
                    "operationId": "run",
                    "requestBody": body("Run"),
                    "responses": ok_json(schema("ExecResult"), "The finished command")
                }
            },
            "/v1/machines/{id}/run/stream": {
                "parameters": [id_param()],
                "post": {
                    "operationId": "runStream",
                    "requestBody": body("Run"),
                    "responses": ndjson("As execStream")
                }
            }
        },
        "components": {
            "securitySchemes": {"key": {"type": "http", "scheme": "bearer", "description": "smk_… from `smol key create NAME`"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "subject": {"type": "string"},
                        "state": {"type": "string", "enum": ["created", "running", "stopped"]},
                        "guest": {"type": "string"}
                    }
                },
                "Config": {
                    "type": "object",
                    "description": "smol::MachineConfig; every field optional",
                    "properties": {
                        "name": {"type": "string", "nullable": true},
                        "image": {"type": "string", "nullable": true},
                        "resources": {
                            "type": "object",
                            "properties": {
                                "cpus": {"type": "integer", "minimum": 0},
                                "memory_mb": {"type": "integer", "minimum": 0},
                                "disk_mb": {"type": "integer", "minimum": 0},
                                "network": {"type": "boolean"}
                            }
                        },
                        "persistent": {"type": "boolean"},
                        "forkable": {"type": "boolean"},
                        "cold_boot": {"type": "boolean"},
                        "ttl_seconds": {"type": "integer", "minimum": 0, "nullable": true},
                        "auto_stop_seconds": {"type": "integer", "minimum": 0, "nullable": true},
                        "mounts": {"type": "array", "items": {"type": "object"}, "description": "Must be empty here (400 otherwise): a remote client's paths would name the server's directories"},
                        "ports": {"type": "array", "items": schema("PortSpec")},
                        "egress_allow": {"type": "array", "items": {"type": "string"}, "nullable": true}
                    }
                },
                "PortSpec": {
                    "type": "object",
                    "required": ["host", "guest"],
                    "properties": {
                        "host": {"type": "integer", "minimum": 0, "maximum": 65535},
                        "guest": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "address": {"type": "string", "description": "Refused here: ports listen on the server's own address"}
                    }
                },
                "PortMapping": {
                    "type": "object",
                    "required": ["address", "host", "guest"],
                    "properties": {
                        "address": {"type": "string"},
                        "host": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "guest": {"type": "integer", "minimum": 1, "maximum": 65535}
                    }
                },
                "CreateMachine": {
                    "type": "object",
                    "required": ["config"],
                    "properties": {"config": schema("Config")}
                },
                "Machine": {
                    "type": "object",
                    "required": ["id", "state", "config"],
                    "properties": {
                        "id": {"type": "string"},
                        "state": {"type": "string", "enum": ["created", "running", "stopped"]},
                        "config": schema("Config")
                    }
                },
                "Fork": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                "Exec": {
                    "type": "object",
                    "properties": {
                        "argv": {"type": "array", "items": {"type": "string"}},
                        "env": {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}},
                        "workdir": {"type": "string", "nullable": true},
                        "timeout_ms": {"type": "integer", "minimum": 0, "nullable": true},
                        "max_output": {"type": "integer", "minimum": 0, "nullable": true},
                        "stdin": {"type": "string", "format": "byte", "nullable": true, "description": "the command's standard input, base64 (at most 8 MiB decoded); /dev/null when absent"},
                        "tty": {
                            "type": "object",
                            "nullable": true,
                            "description": "run on a pseudo-terminal of this size",
                            "required": ["cols", "rows"],
                            "properties": {
                                "cols": {"type": "integer", "minimum": 1, "maximum": 65535},
                                "rows": {"type": "integer", "minimum": 1, "maximum": 65535}
                            }
                        }
                    }
                },
                "Run": {
                    "allOf": [
                        schema("Exec"),
                        {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}}
                    ]
                },
                "ExecResult": {
                    "type": "object",
                    "required": ["exit_code", "stdout", "stderr", "timed_out"],
                    "properties": {
                        "exit_code": {"type": "integer"},
                        "stdout": {"type": "string", "format": "byte"},
                        "stderr": {"type": "string", "format": "byte"},
                        "signal": {"type": "integer", "nullable": true},
                        "timed_out": {"type": "boolean"}
                    }
                },
                "Written": {"type": "object", "required": ["size"], "properties": {"size": {"type": "integer"}}},
                "Pull": {"type": "object", "required": ["reference"], "properties": {"reference": {"type": "string"}}},
                "Image": {
                    "type": "object",
                    "required": ["reference", "digest", "size", "layers"],
                    "properties": {
                        "reference": {"type": "string"},
                        "digest": {"type": "string"},
                        "size": {"type": "integer"},
                        "layers": {"type": "array", "items": {"type": "object"}},
                        "created": {"type": "string", "nullable": true}
                    }
                }
            }
        }
    })
}
