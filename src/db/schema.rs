// Diesel table definitions, the same for SQLite and Postgres (the migrations keep the
// column types to the ones both share). Written to match `diesel print-schema`; keep it
// in step with `migrations/`.

diesel::table! {
    stripe_customers (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        email -> Nullable<Text>,
        name -> Nullable<Text>,
        subscriber_id -> Nullable<Text>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
    }
}

diesel::table! {
    stripe_products (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        name -> Nullable<Text>,
        active -> Nullable<Bool>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
    }
}

diesel::table! {
    stripe_prices (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        product_id -> Nullable<Text>,
        active -> Nullable<Bool>,
        currency -> Nullable<Text>,
        unit_amount -> Nullable<BigInt>,
        recurring_interval -> Nullable<Text>,
        recurring_interval_count -> Nullable<BigInt>,
        lookup_key -> Nullable<Text>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
    }
}

diesel::table! {
    stripe_subscriptions (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        customer_id -> Nullable<Text>,
        status -> Nullable<Text>,
        current_period_start -> Nullable<BigInt>,
        current_period_end -> Nullable<BigInt>,
        cancel_at_period_end -> Nullable<Bool>,
        cancel_at -> Nullable<BigInt>,
        canceled_at -> Nullable<BigInt>,
        ended_at -> Nullable<BigInt>,
        trial_start -> Nullable<BigInt>,
        trial_end -> Nullable<BigInt>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
    }
}

diesel::table! {
    stripe_subscription_items (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        subscription_id -> Nullable<Text>,
        price_id -> Nullable<Text>,
        product_id -> Nullable<Text>,
        quantity -> Nullable<BigInt>,
        current_period_start -> Nullable<BigInt>,
        current_period_end -> Nullable<BigInt>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
    }
}

diesel::table! {
    stripe_api_keys (id) {
        id -> Text,
        kind -> Text,
        livemode -> Bool,
        secret -> Text,
        name -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    stripe_events (id) {
        id -> Text,
        #[sql_name = "type"]
        event_type -> Text,
        livemode -> Bool,
        api_version -> Nullable<Text>,
        created -> BigInt,
        data -> Text,
        status -> Text,
        synced -> Bool,
        error -> Nullable<Text>,
        attempts -> Integer,
        claimed_at -> Nullable<BigInt>,
        received_at -> BigInt,
        processed_at -> Nullable<BigInt>,
        handlers -> Text,
    }
}

diesel::table! {
    stripe_webhook_deliveries (id) {
        id -> BigInt,
        received_at -> BigInt,
        remote_addr -> Nullable<Text>,
        headers -> Text,
        body -> Binary,
        body_size -> BigInt,
        body_truncated -> Bool,
        valid -> Bool,
        event_id -> Nullable<Text>,
        outcome -> Text,
        status_code -> Nullable<Integer>,
        error -> Nullable<Text>,
    }
}

diesel::table! {
    stripe_entitlement_summaries (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
        customer_id -> Nullable<Text>,
        lookup_keys -> Nullable<Text>,
    }
}

diesel::table! {
    stripe_product_features (id) {
        id -> Text,
        livemode -> Bool,
        data -> Text,
        deleted -> Bool,
        stamp -> BigInt,
        synced_at -> BigInt,
        created -> Nullable<BigInt>,
        stamp_rank -> Integer,
        stamp_event -> Nullable<Text>,
        reconcile -> Bool,
        product_id -> Nullable<Text>,
        lookup_key -> Nullable<Text>,
    }
}
